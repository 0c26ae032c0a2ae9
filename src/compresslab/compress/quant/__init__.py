"""The ``quant`` axis (``conf/quant/``), one module per method family:

- :mod:`.ptq` (``ptq_int8``, ``dynamic_int8``), :mod:`.qat` (``qat_int8``) and :mod:`.pt2e`
  (the PT2E flow they share), :mod:`.ort_int8` (``ort_int8``);
- :mod:`.lowbit` (``lowbit``, ``ternary``, ``binary``) with :mod:`.quantizers` and :mod:`.swap`;
- :mod:`.lsq_pact` (``lsq``, ``pact``) with :mod:`.lsq_pact_callback` and :mod:`.bit_allocation`;
- :mod:`.weight_sharing` (``weight_sharing``, Deep Compression's stages 2 and 3).

Their artifact formats are codecs in :mod:`compresslab.compress.codecs` named after the family.
"""
