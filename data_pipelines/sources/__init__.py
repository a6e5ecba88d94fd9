"""Readers of source data, one per kind; each yields pixels and labels only (see base.Source)."""
