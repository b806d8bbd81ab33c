//! The gateway <-> worker protocol, generated from `proto/sharedconn.proto`.
//!
//! WebSocket IDs are `u64`: the high 32 bits are the issuing gateway's tag, the
//! low 32 bits a per-gateway counter. [`ws_id_string`] is the form clients see.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("sharedconn.v1");

/// Builds a WebSocket ID from a gateway tag and that gateway's counter.
pub fn ws_id(gateway_tag: u32, counter: u32) -> u64 {
    (u64::from(gateway_tag) << 32) | u64::from(counter)
}

/// The WebSocket ID as clients see it, e.g. `"1f3a09c2-17"`.
pub fn ws_id_string(ws_id: u64) -> String {
    format!("{:08x}-{}", ws_id >> 32, ws_id & 0xffff_ffff)
}
