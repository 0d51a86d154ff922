"""The claims about batch norm, measured: ``python -m bnjax_train.studies NAME``.

Six studies, each a set of training runs on MNIST-1D with several seeds that tests one claim
that articles about batch normalization repeat (the claims are in
:data:`bnjax_train.studies.render.CLAIMS`)::

    python -m bnjax_train.studies learning_rate     # or placement, dropout, batch_size,
    python -m bnjax_train.studies all --out DIR     # momentum, mcbn; all: the six in a row
    python -m bnjax_train.studies mcbn --quick      # tiny settings, under a minute: a test

Each study writes ``DIR/NAME.json`` (every run's numbers, the settings, the command, commit,
machine, library versions, load and time), ``DIR/NAME.png`` (its figure) and ``DIR/NAME.md``
(the table, ``mean ± std`` over the seeds, and a one-line verdict computed from the numbers).
``docs/studies.md`` shows the full runs, its tables rendered from the committed JSON by
``python -m benchmarks report --update docs/``.

Modules: :mod:`~bnjax_train.studies.engine` (many runs in one compiled step),
:mod:`~bnjax_train.studies.nets` (the network), :mod:`~bnjax_train.studies.settings`,
:mod:`~bnjax_train.studies.training` and :mod:`~bnjax_train.studies.inference` (the runs),
:mod:`~bnjax_train.studies.metrics`, :mod:`~bnjax_train.studies.summary`,
:mod:`~bnjax_train.studies.report_training`, :mod:`~bnjax_train.studies.report_inference` and
:mod:`~bnjax_train.studies.render` (tables and verdicts, no JAX),
:mod:`~bnjax_train.studies.plots` and :mod:`~bnjax_train.studies.cli`.
"""
