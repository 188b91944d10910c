"""ssprompt's benchmark: ``python -m bench`` (or ``ssprompt bench``)."""
