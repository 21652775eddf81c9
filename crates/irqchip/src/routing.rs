//! GSI routing (filled in by the next commit).
