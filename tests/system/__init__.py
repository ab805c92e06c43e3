"""
System tests: mailproxy as a real process in front of real components (Postfix first).

They are skipped unless C{MAILPROXY_SYSTEM=1}; C{.ci/run} starts the components and sets the
environment. To run them by hand (as root, Postfix and swaks installed)::

    eval "$(tests/system/postfix/instance.sh start /tmp/mailproxy-postfix)"
    MAILPROXY_SYSTEM=1 PYTHONPATH=. .venv/bin/trial tests.system
    tests/system/postfix/instance.sh stop /tmp/mailproxy-postfix
"""
