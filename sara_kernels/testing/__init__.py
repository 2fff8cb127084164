"""The library's testing code: what the kernels are checked on and how, shared by the test
suite, the GPU tests, ``python -m sara_kernels selftest`` and the benchmarks.

* :mod:`.tolerances`: the one tolerance table and the comparisons that apply it.
* :mod:`.oracle`: an independent NumPy evaluation, the check on the reference itself.
* :mod:`.cases`: input builders (logits, masks, cu_seqlens, empty sequences: one
  :func:`segmentation` builder), the :class:`Case` table and a case's rounded inputs.
* :mod:`.harness`: a backend run beside the float64 reference on the same inputs, judged
  element-wise (tests) or measured (:func:`check_kernel`, the selftest and the GPU tests).
"""

from .cases import (
    ANCHORS,
    DIVERGENCES,
    DTYPE_NAMES,
    LAYOUTS,
    SEGMENTATIONS,
    Case,
    PairInputs,
    Segmentation,
    Shape,
    case_grid,
    case_logits,
    make_inputs,
    packed_cu_seqlens,
    padding_mask,
    ragged_mask,
    random_logits,
    random_segmentation,
    rotating_case,
    segmentation,
)
from .harness import (
    CheckResult,
    Run,
    assert_backend_matches_reference,
    assert_matches_reference,
    check_kernel,
    check_reference,
    evaluate,
    run,
)
from .oracle import membership, numpy_pair_js, numpy_scores
from .tolerances import (
    FP32_JS_ATOL,
    FP16_SUBNORMAL_ROUNDING,
    GRAD_TOL,
    JS_TOL,
    LOSS_TOL,
    ORACLE_TOL,
    PROBS_TOL,
    GPU_APPROXIMATION_FACTOR,
    assert_grads_close,
    js_errors,
    on_device,
    relative_grad_error,
)
