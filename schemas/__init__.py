"""Tally's contract: event declarations, validation, reason codes, consent levels, topics.

Imports nothing else of Tally's; producers, streams and sinks all speak it.
"""
