//! drover integration tests.
