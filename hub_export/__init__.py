"""Hub folders: the writer every converter uses, ``visualglm-export check`` and ``push``.

See docs/conversion.md. Entry point: ``visualglm-export`` (``hub_export.cli:main``). Nothing is imported
here eagerly, so ``visualglm-export check``/``push`` start without loading torch.
"""

# written into a folder converted without a tokenizer; ``check`` and ``push`` refuse such a folder
INCOMPLETE_MARKER = "CONVERSION_INCOMPLETE.txt"
