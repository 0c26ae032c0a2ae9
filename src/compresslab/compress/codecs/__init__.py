"""Artifact file formats, one module per format, apart from the methods that produce them.

The codec contract (what a new format defines, in ``compress/codecs/<family>.py``):

- ``FORMAT = "compresslab.<format>/<version>"`` and an encode function the method's (pure)
  ``export`` calls, returning a plain-data payload (tensors, numbers, strings, lists, dicts:
  it loads with ``torch.load(weights_only=True)``) that starts with
  :func:`compresslab.artifact.spec_fields` / ``context_fields``;
- ``load_payload(payload) -> nn.Module``: rebuilds a working model through the zoo's
  ``build_model`` / :func:`compresslab.compress.structure.build_structure` (no pickled code runs);
  its line in :data:`compresslab.artifact.ARTIFACT_LOADERS` is the only way a file reaches it;
- ``CODEC = Codec(format=FORMAT, kind=..., lossless=..., onnx_weights=..., onnx_form=None)``
  (:class:`compresslab.artifact.Codec`): what ``deploy/`` asks (through :func:`compresslab.artifact.codec_of`)
  to export and check the ONNX file. ``onnx_form`` is only for a format whose ONNX graph is not
  the module its loader builds (int8 QDQ, a stored ONNX model);
- **stacking**: every tensor the codec stores as it is (a state dict, a rest of unquantized
  tensors, graph constants) goes through the shared sparse layer,
  :func:`.sparse.pack_state` / :func:`.sparse.unpack_state` (bitmask or index layout per tensor
  when smaller), and a codec that re-codes weights (bit-packed codes) drops the zero code through
  :func:`.sparse.split_zeros` / :func:`.sparse.merge_zeros`, so a pruned student's zeros survive
  any claiming format. :func:`.stacking.stacked_encodings` reads back from a payload which
  encodings it stacks (``student.encodings`` in results.json); a format that cannot keep
  zeros (an ONNX Runtime model, binary codes) is recorded under ``not_stacked`` with the reason.

Formats:

- :mod:`.sparse` ``compresslab.sparse/1``: the shared sparse layer; as a format, a pruned dense state dict
- :mod:`.structured` ``compresslab.structured/1``: arch spec + channel-pruned state dict
- :mod:`.int8` ``compresslab.int8_pt2e/1``: PT2E int8 graph constants and qparams (ONNX: QDQ graph)
- :mod:`.lowbit` ``compresslab.lowbit/1``: bit-packed low-bit weight codes + scales
- :mod:`.lsq_pact` ``compresslab.actquant/1``: bit-packed LSQ / PACT weights + activation quantizers
- :mod:`.lowrank` ``compresslab.lowrank/1``: arch spec + factorization plan + state dict
- :mod:`.weight_sharing` ``compresslab.shared/1``: Huffman-coded shared weights (Deep Compression)
- :mod:`.fuse_bn` ``compresslab.fused/1``: BatchNorm folded into conv/linear
- :mod:`.packed_int` ``compresslab.packed_int/1``: group-wise 2..8-bit codes + fp16 scales (RTN, GPTQ, AWQ, SmoothQuant)
- :mod:`.ort_int8` ``compresslab.onnx_qdq/1``: an ONNX Runtime QDQ model's bytes (ONNX: those bytes)

Codec helpers: :mod:`.bitpack` (bit-packing, dtype names, flat containers), :mod:`.huffman`,
:mod:`.stacking`.
"""
