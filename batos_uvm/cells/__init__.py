"""Cells: where generated code runs (see docs/CELLS.md).

Imported by the cells themselves, so this package's ``__init__`` imports
nothing: take what you need from its modules (``pool``, ``invocation``,
``local``, ``wire``, ``sandbox``, ``runtime``, ``runner``, ``doctor``).
"""
