"""Registry errors, split by who is at fault so the control plane can map them to gRPC status codes."""


class DeviceNotFoundError(LookupError):
    """The device id is not registered."""


class InvalidInputError(ValueError):
    """The caller sent something the registry must not store (bad budget, calibration, profile, density)."""


class EnrollmentError(PermissionError):
    """An enrollment token that cannot be spent (unknown, spent, expired, or issued for another name)."""
