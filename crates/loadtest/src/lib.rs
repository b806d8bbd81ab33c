//! The load generator that compares sharedconn's shared and private modes
//! against a no-hop baseline.
//!
//! How it works: a scenario opens many WebSocket clients from several
//! 127.0.0.x source addresses to one or more servers on this machine, drives
//! them (chat messages that carry their send time, idle sockets, or a join
//! storm), accounts what every client receives, and reads the servers' CPU
//! and memory from `/proc`. `compare` starts each mode's servers as separate
//! processes, runs the same scenario against each, and writes a table, JSON
//! and an SVG chart. The baseline server it compares against ships here too.
//!
//! Modules:
//! - [`cli`]: the command line (scenario flags shared by single runs and `compare`).
//! - [`scenario`]: `chat`, `idle`, `join`, and what they share (setup, connect phase, bounded waits).
//! - [`client`]: one load client's connect, handshake and Status frame.
//! - [`wire`]: the client protocol: frame types, the latency marker in the text, alias counting.
//! - [`tracker`]: loss, duplicate, order and latency accounting of `chat`.
//! - [`procstat`]: CPU and RSS of server processes from `/proc`.
//! - [`baseline`]: the single-process reference broadcast server.
//! - [`compare`]: modes side by side; [`launch`] starts and stops their servers
//!   and reads a gateway's `/metrics` (its closes by code).
//! - [`report`]: results as JSON and text; [`chart`]: the SVG chart.
//! - [`net`]: loopback-only targets and source addresses; [`sys`]: the libc calls.
//! - [`progress`]: the progress bar.

pub mod baseline;
pub mod chart;
pub mod cli;
pub mod client;
pub mod compare;
pub mod kernel;
pub mod launch;
pub mod net;
pub mod procstat;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod sys;
pub mod tracker;
pub mod wire;
