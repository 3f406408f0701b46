//! drover coordinator (placeholder until the coordinator issue).
