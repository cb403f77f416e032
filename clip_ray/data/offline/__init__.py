"""Offline data jobs on Ray: convert a data set between formats, curate it by query matching."""
