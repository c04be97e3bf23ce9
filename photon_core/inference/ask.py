"""Ask Photon a question about a CT from the command line.

    python -m photon_core.inference.ask --scan sample_cases/abdomen_ct/ct.nii.gz \\
        --question "Is there a lesion in the liver?"
    python -m photon_core.inference.ask --scan series.zip --question "..." --budget 25% --json
    python -m photon_core.inference.ask --scan now.nii.gz --prior before.nii.gz \\
        --question "Has the liver lesion grown?"
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from photon_core.inference.predictor import MAX_NEW_TOKENS_LIMIT
from photon_core.model.hub import add_model_arguments


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Ask Photon a question about a CT scan.")
    ap.add_argument("--scan", required=True, help="NIfTI/NRRD file, DICOM folder or .zip")
    ap.add_argument("--prior",
                    help="an earlier scan of the same patient, asked together (questions about change)")
    ap.add_argument("--question", required=True)
    ap.add_argument("--budget", default=None,
                    help="auto | full | 300 | 25%% | top_k:300 | ratio:0.25 | threshold:0.4 | "
                         "fastv:300 | visionzip:300 | random:300 (default: auto on an S2 "
                         "checkpoint, full on S1)")
    add_model_arguments(ap)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--max-new-tokens", type=int, default=32,
                    help=f"longest answer, in tokens (default: %(default)s, at most {MAX_NEW_TOKENS_LIMIT})")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:    # said before a model and a scan load
        ap.error(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    from photon_core.inference.predictor import Predictor
    from photon_core.io.volume import load_volume

    try:
        t = time.perf_counter()
        vol = load_volume(args.scan)
        pred = Predictor(args.model, subfolder=args.subfolder, revision=args.revision, device=args.device)
        pred.set_volume(vol, prior=load_volume(args.prior) if args.prior else None)
        prep_s = time.perf_counter() - t
        ans = pred.ask(args.question, budget=args.budget, max_new_tokens=args.max_new_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        d = ans.to_dict()
        d.pop("kept_indices")
        d.update(model=pred.name, load_prepare_encode_s=round(prep_s, 3))
        print(json.dumps(d))
    else:
        from photon_core.inference.answers import question_type

        print(ans.text if ans.readable else f"unreadable answer (not an answer of this question's type): "
                                            f"{ans.text!r}")
        if pred.checkpoint.source == "embedded" and question_type(args.question) == "open":
            print("note: the demo model was trained only on English questions of a few kinds (is there…, "
                  "which organ, which side, how many, how large, a choice of two); this question is none of "
                  "them, so its answer means nothing")
        theta = f"θ={ans.theta:.3f}" if ans.theta == ans.theta else "no θ (S1)"
        print(f"visual tokens kept: {ans.kept}/{ans.total} ({100 * ans.keep_fraction:.1f}%), "
              f"budget {ans.budget}, {theta}, prefill {ans.prefill_s * 1000:.0f} ms, "
              f"decode {ans.decode_s * 1000:.0f} ms, model: {pred.name}")
        if ans.prior_total:
            print(f"of which the prior scan: {ans.prior_kept}/{ans.prior_total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
