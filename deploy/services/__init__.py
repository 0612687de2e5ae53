"""Running children: the one way Tally starts, watches and stops a process (``process``), and
the supervisor of ``tally up`` (``supervisor``)."""
