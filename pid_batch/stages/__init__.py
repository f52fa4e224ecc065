"""The row stages Ray Data runs, one module each, and the row schema they share (no Ray here).

rows      every column a row carries between stages: type, default, the stage that adds it
reader    shard URI → one row per pending sample (PiD-form latent, or an error row)     CPU
decode    VaeStage, DecodeStage: rows → rows with raw uint8 images (torch)              GPU
writer    encode_write: images encoded and written, timing parts, tar merge, finish    CPU
resume    plan_shards, done ids, duplicate ids, lost samples                           driver
checks    a row's sample against the job: backbone, output size
layout    output URIs, ids, keys, done markers, row cell helpers

Importing the package, or any module but `decode`, loads no torch; `decode` imports it only
when a stage is built, in the actor processes (tests/test_worker_imports.py).
"""
