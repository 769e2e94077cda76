"""pytest settings shared by test_all.py: the `slow` marker (deselect with `-m "not slow"`)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (tens of seconds on CPU)")
