//! `masa run SPEC`: the whole pipeline from one experiment spec, every artifact cached by the
//! hash of its inputs and options, results in `runs/<name>/results.json`, then the report.

pub mod results;
