"""Built-in kvpolicy policies, one module per method, each registered through the ``kvpolicy.plugins`` entry points."""
