"""Fold: head coefficients -> an ordinary checkpoint, the fourth step of the pipeline.

Like PEFT's IA3 tuner, the pieces sit side by side:

* `coefficients`: what a coefficients.json holds, checked against a model's heads;
* `scaling`: `HeadScaling`, the hooks that apply coefficients at run time (trainable), and
  `fold`/`unfold`, which write them into (and out of) the output-projection weights, or the
  query projection's for scales on the queries (`coefficients.SITES`);
* `checkpoint`: `verify_fold` (folded logits == hooked logits), `save_checkpoint` and
  `fold_and_save`, the whole step behind `pear fold`.
"""

from .checkpoint import (FP32_CHECK_TOLERANCE, HUB_IDS, RELATIVE_TOLERANCE, AtomicDir, Verification, base_file_info, check_out_dir,
                         fold_and_save, save_checkpoint, verification_input, verify_fold)
from .coefficients import (SITES, Coefficient, HeadKey, check_coefficients, coefficients_json, granularity,
                           is_channelwise, read_coefficients, read_site, summary_value)
from .scaling import HeadScaling, fold, unfold

__all__ = [
    "FP32_CHECK_TOLERANCE", "HUB_IDS", "RELATIVE_TOLERANCE", "AtomicDir", "Verification", "base_file_info", "check_out_dir", "fold_and_save",
    "save_checkpoint", "verification_input", "verify_fold", "Coefficient", "HeadKey", "check_coefficients",
    "coefficients_json", "granularity", "is_channelwise", "read_coefficients", "summary_value", "HeadScaling", "fold",
    "unfold", "SITES", "read_site",
]
