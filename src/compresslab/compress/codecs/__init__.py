"""Artifact file formats, one module per format, apart from the methods that produce them.

Each format module defines its ``FORMAT`` string, the encode side that writes a plain-data
payload (tensors, numbers, strings, lists, dicts: it loads with ``torch.load(weights_only=True)``)
and ``load_payload(payload) -> nn.Module``, which rebuilds a working model from that payload
through the zoo's ``build_model`` (no pickled code runs). :data:`compresslab.artifact.ARTIFACT_LOADERS`
lists every ``FORMAT`` with its ``load_payload``.

- :mod:`.sparse` ``compresslab.sparse/1``: bitmask / index sparse state dict (unstructured pruning)
- :mod:`.structured` ``compresslab.structured/1``: arch spec + channel-pruned state dict
- :mod:`.int8_pt2e` ``compresslab.int8_pt2e/1``: PT2E int8 graph constants and qparams
- :mod:`.lowbit` ``compresslab.lowbit/1``: bit-packed low-bit weight codes + scales
- :mod:`.actquant` ``compresslab.actquant/1``: bit-packed LSQ / PACT weights + activation quantizers
- :mod:`.lowrank` ``compresslab.lowrank/1``: arch spec + factorization plan + state dict
- :mod:`.shared` ``compresslab.shared/1``: Huffman-coded shared weights (Deep Compression)
- :mod:`.fused` ``compresslab.fused/1``: BatchNorm folded into conv/linear
- :mod:`.onnx_qdq` ``compresslab.onnx_qdq/1``: an ONNX Runtime QDQ model's bytes

Codec helpers: :mod:`.bitpack` (bit-packing, dtype names, flat containers), :mod:`.huffman`;
the format and arch-spec fields every payload starts with are :func:`compresslab.artifact.spec_fields`.
"""
