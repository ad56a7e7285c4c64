"""The benchmark modes, one module each: ``DEFAULTS`` and ``SMOKE`` (the option values of a real run and of a
``--smoke-cpu`` run), ``add_arguments(parser)`` for the mode's own options, and ``run(args, device, record, save)``,
which fills ``record.data`` and calls ``save()`` whenever it has something worth keeping."""
