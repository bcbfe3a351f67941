"""Tile utilities shared by the stages that work on in-memory tiles.

Modules
-------
* ``folders``: image files and labelled tile folders (``<root>/<class>/<tile>``), :func:`read_rgb`, source ids
  parsed from tile file names.
* ``split``: the source split of a labelled folder (by source image, never by tile where sources are known).
* ``transform``: a tile at some µm/px → the array an encoder sees (rescale to its µm/px, then the one
  crop/pad rule).
* ``embed``: the one embedding loop for in-memory uint8 tiles.
* ``palette``: the one class palette (QuPath exports, TME class maps).
"""
