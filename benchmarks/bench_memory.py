"""Memory: activation bytes stored per example, and peak RSS of an in-process teacher + student.

Checks that every teacher record's activation tensor holds exactly L x T_i x d x bytes(dtype)
bytes (T_i: the tokens that example actually produced), for bf16 and fp32 storage, and that the
records survive a save/load through ``ia2dist.teacher.cache`` with the same payload. Peak RSS of the
benchmark process after extraction and after a student epoch is reported (ru_maxrss); the RSS of
the distributed run's teacher actors and student workers is in the pipeline benchmark.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import (bench_examples, build_bench_model, build_bench_tokenizer, fmt_bytes,
                               icl_prompts, md_table, peak_rss_bytes)


def run(*, quick: bool = False, device: str = "cpu") -> dict:
    from ia2dist.teacher.extract import extract

    tokenizer = build_bench_tokenizer()
    model = build_bench_model(tokenizer, device=device)
    model.set_attn_implementation("sdpa")
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    count, T = (4, 8) if quick else (16, 32)
    prompts = icl_prompts(bench_examples(128), 8, count)
    uids = [f"m{i}" for i in range(count)]
    rss_start = peak_rss_bytes()
    rows = []
    for dtype, nbytes in ((torch.bfloat16, 2), (torch.float32, 4)):
        records = extract(model, tokenizer, prompts, uids, max_new_tokens=T, act_dtype=dtype)
        stored = [r.acts_LTD.numel() * r.acts_LTD.element_size() for r in records]
        expected = [L * len(r.response_ids) * D * nbytes for r in records]
        rows.append({"act_dtype": str(dtype).removeprefix("torch."), "examples": count,
                     "L": L, "d": D, "T_max": T,
                     "T_i": [len(r.response_ids) for r in records],
                     "bytes_per_example": stored, "expected": expected,
                     "exact": stored == expected,
                     "saved_roundtrip_exact": _roundtrip(records)})
    rss_teacher = peak_rss_bytes()
    result = {"name": "memory", "rows": rows, "peak_rss_start_bytes": rss_start,
              "peak_rss_after_extract_bytes": rss_teacher}
    result["markdown"] = markdown(result)
    return result


def _roundtrip(records) -> bool:
    """Same activation payload after ``save_records`` / ``load_records``."""
    from ia2dist.teacher.cache import load_records, save_records

    with tempfile.TemporaryDirectory() as tmp:
        save_records(Path(tmp) / "shard", records, meta={})
        loaded = load_records(Path(tmp) / "shard")
    return len(loaded) == len(records) and all(torch.equal(a.acts_LTD, b.acts_LTD) and a.acts_LTD.dtype == b.acts_LTD.dtype
               for a, b in zip(records, loaded))


def markdown(res: dict) -> str:
    rows = [[r["act_dtype"], r["examples"], f"{r['L']} x T_i x {r['d']} x "
             f"{2 if r['act_dtype'] == 'bfloat16' else 4}",
             f"{min(r['T_i'])}-{max(r['T_i'])}", fmt_bytes(sum(r["bytes_per_example"]) / r["examples"]),
             "yes" if r["exact"] else "NO",
             {True: "yes", False: "NO", None: "-"}[r["saved_roundtrip_exact"]]]
            for r in res["rows"]]
    return (md_table(["act dtype", "examples", "expected bytes", "T_i", "mean bytes/example",
                      "stored == expected", "save/load identical"], rows)
            + f"\n\nPeak RSS of the benchmark process after in-process extraction: "
              f"{fmt_bytes(res['peak_rss_after_extract_bytes'])}.")


if __name__ == "__main__":
    print(run(quick=True)["markdown"])
