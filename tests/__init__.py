"""The test suite, a package so that tests import their helpers (``tests.serving_support``,
``tests.fixtures.make_reference_scores``) by name; run from the repository root."""
