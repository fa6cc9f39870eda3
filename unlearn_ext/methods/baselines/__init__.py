"""The neighbouring systems' methods, one module per family; importing this package registers them.

* :mod:`.ascent` — ``ga``, ``ng_plus``;  :mod:`.relabelling` — ``srl``, ``salun``;
  :mod:`.conv_kernels` — ``msg``, ``ct``;  :mod:`.distillation` — ``scrub``, ``bad_teacher``;
  :mod:`.last_blocks` — ``cfk``, ``euk``;  :mod:`.fisher` — ``fisher``;  :mod:`.influence` — ``influence``
  (all Deep Unlearn's, github.com/xcadet/deepunlearn);
* :mod:`.certified` — ``certified`` (Zhang et al., ICML 2024);  :mod:`.sfron` — ``sfron`` (Huang et al.,
  NeurIPS 2024).
"""
from . import (ascent, certified, conv_kernels, distillation, fisher, influence, last_blocks,  # noqa: F401
               relabelling, sfron)
