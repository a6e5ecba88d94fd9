"""Weights in and out of mermed-jax: PyTorch (timm, DINO, the MerMED release) and our own files.

Pure format code: files <-> arrays in our layout. Nothing here imports mermed_jax.training; putting
imported weights into a TrainState is mermed_jax/training/init_from_pretrained.py.

trees.py             our parameter trees: expected shapes, scanned <-> unrolled blocks
timm_names.py        our leaves <-> timm / DINO-head state_dict names and tensor layouts
files.py             reading and writing safetensors, .pth and msgpack without unpickling
pos_fit.py           a checkpoint's pos_embed fitted to our grid and token layout (registers, resizing)
import_report.py     what an import produced: our arrays, and which tensors matched and which did not
pytorch_import.py    a PyTorch state_dict -> our backbone and head, with a report
importer.py          load_weights: any supported file (our msgpack or PyTorch) -> our arrays, with a report
weight_export.py     our teacher -> msgpack / safetensors (timm names) / .pth, with a config JSON
exported_encoder.py  load_encoder(path): an exported file -> an ExportedEncoder that embeds images
"""
