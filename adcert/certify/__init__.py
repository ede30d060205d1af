"""The certifier: staged, sound, journaled, resumable, sharded.

    from adcert.certify import certify, report, format_table, load_model
    model = load_model("run/final.pt")
    res = certify(model, x, y, eps=2/255, stages=("autoattack", "ibp", "crown", "alpha-crown"),
                  out_dir="cert/", shard=(0, 4))
    print(format_table(report(["cert/"])))

Per sample: ``clean`` -> each requested stage on what is still undecided -> verdict
``misclassified`` | ``attacked`` (a verified counterexample saved) | ``certified`` (by a sound
bound, with the deciding stage) | ``unknown``. See :mod:`adcert.certify.pipeline` (the loop),
:mod:`~adcert.certify.stages` (the stage interface), :mod:`~adcert.certify.bab` (input-split
branch-and-bound for tiny models), :mod:`~adcert.certify.journal` (the JSON-lines journal),
:mod:`~adcert.certify.report` (merging shards) and :mod:`~adcert.certify.cli`
(``adcert certify``).
"""
from adcert.certify.journal import Journal, JournalError, JournalLock, JournalLocked, read_journal
from adcert.certify.model_io import ModelFileError, load_model
from adcert.certify.pipeline import (
    CertifyInterrupted, CertifyResult, JournalMismatch, StageUnavailable, certify, parse_shard,
    shard_from_env,
)
from adcert.certify.report import format_table, report
from adcert.certify.stages import DEFAULT_STAGES, STAGE_NAMES, Outcome, make_stage

__all__ = ["certify", "CertifyResult", "StageUnavailable", "JournalMismatch", "JournalLocked",
           "CertifyInterrupted", "parse_shard", "shard_from_env", "report", "format_table",
           "load_model", "ModelFileError", "Journal", "JournalLock", "JournalError",
           "read_journal", "DEFAULT_STAGES", "STAGE_NAMES", "Outcome",
           "make_stage"]
