//! The library's own tests that need test builds (the delay hook, the broken sequence).
