"""Evaluation helpers shared by the study scripts and their tests: the synthetic key-value
retrieval task (:mod:`cpmjax.evals.kv_retrieval`) and the APB quality study's metrics and
hidden-state harness (:mod:`cpmjax.evals.apb_quality`). Import the submodules."""
