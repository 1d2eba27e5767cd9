//! Learners, one file per method.
