"""The claims about batch norm, measured: ``python -m bnjax_train.studies NAME``.

Nine studies, each a set of training runs with several seeds that tests one claim that
articles about batch normalization repeat (the claims are in
:data:`bnjax_train.studies.render.CLAIMS`), on MNIST-1D; the last three also on
scikit-learn's 8x8 digits (``--dataset digits``)::

    python -m bnjax_train.studies learning_rate     # or placement, dropout, batch_size,
    python -m bnjax_train.studies all --out DIR     # momentum, mcbn, covariate_shift,
                                                    # smoothness, regularization; all: in a row
    python -m bnjax_train.studies smoothness --dataset digits   # writes smoothness_digits.*
    python -m bnjax_train.studies mcbn --quick      # tiny settings, under a minute: a test

Each study writes ``DIR/NAME.json`` (every run's numbers, the settings, the command, commit,
machine, library versions, load and time), ``DIR/NAME.png`` (its figure) and ``DIR/NAME.md``
(the table, ``mean ± std`` over the seeds, and a one-line verdict computed from the numbers;
a ``--quick`` run has no verdict: it decides nothing). ``docs/studies.md`` shows the full
runs, its tables rendered from the committed JSON by ``python -m benchmarks report --update
docs/``.

Modules: :mod:`~bnjax_train.studies.engine` (many runs in one compiled step),
:mod:`~bnjax_train.studies.nets` (the network), :mod:`~bnjax_train.studies.settings`,
:mod:`~bnjax_train.studies.training`, :mod:`~bnjax_train.studies.inference` and
:mod:`~bnjax_train.studies.landscape` (the runs),
:mod:`~bnjax_train.studies.metrics`, :mod:`~bnjax_train.studies.summary`,
:mod:`~bnjax_train.studies.report_training`, :mod:`~bnjax_train.studies.report_inference`,
:mod:`~bnjax_train.studies.report_landscape` and :mod:`~bnjax_train.studies.render` (tables,
verdicts and provenance lines, no JAX),
:mod:`~bnjax_train.studies.plots` and :mod:`~bnjax_train.studies.cli`.
"""
