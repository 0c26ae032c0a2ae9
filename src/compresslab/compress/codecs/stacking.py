"""What an artifact stacks: read back from the saved payload, recorded as ``student.encodings``.

``stacks`` lists the encodings the file actually holds, its codec's ``kind`` first, then
``sparse`` when the shared sparse layer (:mod:`.sparse`) stored any tensor in a bitmask / index
layout (or a codec dropped zero codes, or the codec's own ``holds_sparse`` says so: Deep
Compression's relative-index layout),
``lowrank`` / ``structured`` when the payload's structure carries a factorization plan or
channel-pruned shapes. ``not_stacked`` names each configured method whose ``codec_kind`` the file
does not hold, with the reason, so a dropped encoding is never silent.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from compresslab.artifact import codec_of

#: layouts that store fewer elements than the tensor has (the shared layer's and the Deep
#: Compression codec's); a lowbit layer with ``zeros_dropped`` went through ``split_zeros``
SPARSE_LAYOUTS = ("bitmask", "index", "sparse")


def _holds_sparse(obj: Any) -> bool:
    if isinstance(obj, Mapping):
        if obj.get("layout") in SPARSE_LAYOUTS or obj.get("zeros_dropped"):
            return True
        return any(_holds_sparse(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_sparse(v) for v in obj)
    return False


def stacked_encodings(payload: Mapping[str, Any]) -> list[str]:
    """The encodings a payload stacks (see the module doc); [] for a plain dense file."""
    codec = codec_of(payload.get("format"))
    kind = codec.kind
    found = [] if kind == "dense" else [kind]
    structure = payload.get("structure") or {}
    if (structure.get("lowrank") or payload.get("plan")) and "lowrank" not in found:
        found.append("lowrank")
    if structure.get("resized") and "structured" not in found:
        found.append("structured")
    own = codec.holds_sparse(payload) if codec.holds_sparse is not None else False
    if kind != "sparse" and (own or _holds_sparse(payload)):
        found.append("sparse")
    return found


def encodings_record(payload: Mapping[str, Any], methods: Iterable[Any]) -> dict[str, Any]:
    """``student.encodings``: the file's ``format``, what it ``stacks``, and ``not_stacked``
    ``{axis: reason}`` for each method whose ``codec_kind`` the file does not hold."""
    fmt = payload.get("format")
    stacks = stacked_encodings(payload)
    missing = {}
    for method in methods:
        wanted = getattr(method, "codec_kind", None)
        if wanted and wanted not in stacks:
            missing[method.axis] = (f"{method.axis}={method.name}'s {wanted} encoding is not in the {fmt} file "
                                    f"(its format keeps no {wanted} layout of these tensors)")
    return {"format": fmt, "stacks": stacks, "not_stacked": missing}
