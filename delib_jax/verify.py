"""``delib verify OUT``: check an output folder of ``delib explain`` without a model, e.g. after copying it.

    delib verify explained/        # one line per problem, a summary; exit 0 clean, 1 damaged, 2 usage error

Checks the manifest, the explanations folder, every index line, every shard (header, dtypes and shapes against the
manifest's settings, byte ranges, run id, the image of each row, the digest and content of the records, the masks,
the shard's own checksums) and that no image has two records (`delib_jax.store.verify_folder`), each line judged as
`load_explanations` judges it: the lines printed are the reader's messages, the records counted as not served are
those it refuses. A damaged folder is repaired by running the same ``delib explain`` again: it re-explains exactly
those images (or names what is in its way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from delib_jax._command import Command, UsageError

DESCRIPTION = """\
Check an output folder of delib explain without a model: the manifest, every index line and every shard (its
header, the dtypes and shapes of its arrays against the manifest's settings, its run, the image each row belongs
to, the digest its records name, its masks), and that no image has two records.

Prints one line per problem (a shard's once, with the number of records it keeps from being served) and a summary
with the number of records that cannot be served: exactly those delib_jax.load_explanations refuses. Exit status:
0 clean, 1 damage found, 2 usage error (not a folder of explanations, or one of an older format). Running the
same delib explain command again repairs a damaged folder: it re-explains exactly those images, or names what is
in its way (a file where a folder belongs, a link, a folder it cannot read).
"""


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="an output folder of delib explain")
    p.add_argument("--quiet", action="store_true", help="print the summary only")


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from delib_jax import store as st

    out = Path(args.out)
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder")
    if not ((out / st.MANIFEST).exists() or (out / st.MANIFEST).is_symlink()):
        raise UsageError(f"{out} holds no explanations ({st.MANIFEST} missing)")
    with tqdm(
        total=st.stored_bytes(out), unit="B", unit_scale=True, desc="verify", disable=None, file=sys.stderr
    ) as bar:
        try:
            verdict = st.verify_folder(out, progress=bar.update)
        except st.StoreDamage as e:  # never raised for damage (it is reported), kept as a safety net
            verdict = st.Verdict(problems=[str(e)])
        except (st.StoreError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
    if not args.quiet:
        for line in [*verdict.problems, *(f"note: {n}" for n in verdict.notes)]:
            print(line)
    summary = f"{verdict.records} explained and {verdict.skipped} skipped records, {verdict.shards} shards"
    if verdict.problems:
        refused = "nothing can be served" if verdict.unusable else f"{verdict.refused} record(s) cannot be served"
        print(f"{out}: DAMAGED: {len(verdict.problems)} problem(s), {refused}, in {summary}; run the same delib "
              "explain again to re-explain what is damaged (it says what is in its way, if anything)")  # fmt: skip
        return 1
    print(f"{out}: clean: {summary}" + (f" ({len(verdict.notes)} note(s))" if verdict.notes else ""))
    return 0


COMMAND = Command("verify", "check an output folder of explanations for damage", DESCRIPTION, _configure, _run)

__all__ = ["COMMAND"]
