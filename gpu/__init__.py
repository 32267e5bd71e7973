"""gpu: the port of the reference semantics for full-size models, on CuPy or NumPy.

The decisions (scores -> ranks -> criterion -> kept sets) are the reference's
own code in `reference/asl/methods.py`; this package supplies a second engine
(`gpu.engine.PortEngine`) that does the arithmetic at size: blocked attention
(softmax with a fixed per-row shift), MLP in token chunks, float16 weights with float32
accumulation, preallocated KV caches. Importing `gpu` never requires CuPy.
"""
