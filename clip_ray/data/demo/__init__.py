"""The demo data set, drawn rather than downloaded: scenes of coloured shapes with varied captions."""
