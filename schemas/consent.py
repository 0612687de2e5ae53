"""Consent levels: the user's choice over what is shared.

Privacy statement, "Control your Personal Information": the user chooses what is shared.
Each event carries the level in force when it was made; producers refuse to emit what the
level forbids and the stream step enforces it again, so a misbehaving client cannot widen it.
"""

from enum import StrEnum


class Consent(StrEnum):
    """What may survive the stream step for an event."""

    FULL = "full"
    """Pseudonymous user and session ids (keyed HMAC), linkable across days; coarse geo;
    referrer domain; browser, OS and device class."""

    ANONYMOUS = "anonymous"
    """Counted, but not linkable beyond one UTC day: ids are HMAC'd under a random key of
    their UTC day, destroyed once the day is past the allowed lateness, after which nobody
    (the operator included) can link or recompute them. Country only (no region); referrer
    domain kept."""

    NONE = "none"
    """Only what operating the service needs (privacy statement, "Collection of Personal
    Information": "used for the operation of the service, to maintain the quality"): the
    event type and its service-quality fields, software version, OS and browser family,
    country. No user id, no session id, no region, no referrer. Such events feed service
    health (error and drop rates, quality percentiles) but never unique-user counts."""


def allows_user_linking(consent: Consent) -> bool:
    """Whether a pseudonymous id that is stable across days may be kept."""
    return consent is Consent.FULL


def allows_identifiers(consent: Consent) -> bool:
    """Whether any pseudonymous id (even a daily one) may be kept."""
    return consent is not Consent.NONE
