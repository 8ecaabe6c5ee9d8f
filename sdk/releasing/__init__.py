"""`edgeq release`, an app of its own: the release file (`file`), the task graph (`graph`), running it locally or on
Ray (`run`) and the report (`report`). `edgeq.release()` is the public entry; this package does not take that name."""
