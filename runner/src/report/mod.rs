//! `fer report NAME`: tables and figures of the thesis from the results database.

pub mod spec;
