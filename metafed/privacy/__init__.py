"""Privacy: client-level differential privacy with an accountant, and secure aggregation."""
