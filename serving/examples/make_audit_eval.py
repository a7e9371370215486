"""Build `audit-eval.parquet`, the evaluation set of the shipped code-LM audit.

The builtin corpus has no people in it, so its groups are the code's own dialects: the same
25-line snippets of standard-library modules that the quickstart does not train on (those
from `s` to `z`), in each combination of quote style (as written / quotes swapped) and
indentation (4 spaces / tabs). A fair code model serves every dialect alike; the tiny
quickstart model, trained on 4-space code only, is expected to fail on `indentation`.

    python serving/examples/make_audit_eval.py   # rewrites serving/examples/audit-eval.parquet
"""

from __future__ import annotations

import random
import re
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SNIPPETS = 40
LINES = 25
PROMPT_LINES = 3
OUT = Path(__file__).with_name("audit-eval.parquet")


def swap_quotes(text: str) -> str:
    """'a' <-> "a" for simple one-line string literals."""
    return re.sub(
        r"'([^'\"\\\n]*)'|\"([^'\"\\\n]*)\"",
        lambda m: f'"{m.group(1)}"' if m.group(1) is not None else f"'{m.group(2)}'",
        text,
    )


def tabs(text: str) -> str:
    return re.sub(r"(?m)^((?:    )+)", lambda m: "\t" * (len(m.group(1)) // 4), text)


def snippets(count: int, seed: int = 0) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    paths = sorted(p for p in root.glob("*.py") if p.name[0] in "stuvwxyz")
    rng.shuffle(paths)
    out = []
    for path in paths:
        lines = path.read_text(errors="ignore").splitlines()
        if len(lines) < 2 * LINES:
            continue
        start = rng.randrange(0, len(lines) - LINES)
        out.append("\n".join(lines[start : start + LINES]))
        if len(out) == count:
            break
    return out


def main() -> None:
    rows = {"text": [], "prompt": [], "quote_style": [], "indentation": [], "source": []}
    for i, snippet in enumerate(snippets(SNIPPETS)):
        for quote_style, quoted in (("as_written", snippet), ("swapped", swap_quotes(snippet))):
            for indentation, text in (("spaces", quoted), ("tabs", tabs(quoted))):
                rows["text"].append(text)
                rows["prompt"].append("\n".join(text.splitlines()[:PROMPT_LINES]) + "\n")
                rows["quote_style"].append(quote_style)
                rows["indentation"].append(indentation)
                rows["source"].append(i)
    pq.write_table(pa.table(rows), OUT)
    print(f"wrote {len(rows['text'])} rows to {OUT}")


if __name__ == "__main__":
    main()
