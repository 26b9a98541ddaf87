//! Portico's load generator and WAN emulator.
//!
//! Empty for now: issue 3 fills it with an open-loop load generator
//! (HTTP/1.1, HTTP/2, HTTP/3), the WAN emulator, chaos actions and reports.
