"""Weights in and out of mermed-jax: PyTorch (timm, DINO, the MerMED release) and our own files.

trees.py         our parameter trees: expected shapes, scanned <-> unrolled blocks
timm_names.py    our leaves <-> timm / DINO-head state_dict names and tensor layouts
files.py         reading and writing safetensors, .pth and msgpack without unpickling
pytorch_import.py  a PyTorch state_dict -> our backbone and head, with a report
importer.py      any supported file -> our params, and into a TrainState (student and teacher)
export.py        our teacher -> msgpack / safetensors (timm names) / .pth, with a config JSON
encoder.py       load_encoder(path): an exported file -> a callable that embeds images
"""
