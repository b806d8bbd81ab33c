//! The gateway <-> worker protocol, generated from `proto/sharedconn.proto`.
//!
//! WebSocket IDs are `u64`: the high 32 bits are the issuing gateway's tag, the
//! low 32 bits a per-gateway counter. [`ws_id_string`] is the form clients see.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("sharedconn.v1");

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers. tonic's default
/// (8 KiB each way) is allocated per stream up front; in private mode, with
/// a stream per socket, that was most of a socket's memory on both sides.
/// The buffers still grow for bigger messages.
const CODEC_BUFFER: usize = 1024;
/// Bytes encoded before the encoder yields (tonic's default).
const CODEC_YIELD: usize = 32 * 1024;

/// The prost codec with small initial buffers.
#[derive(Debug, Clone, Copy)]
pub struct LinkCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LinkCodec<T, U> {
    fn default() -> Self {
        LinkCodec(PhantomData)
    }
}

impl<T, U> Codec for LinkCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(CODEC_BUFFER, CODEC_YIELD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(CODEC_BUFFER, CODEC_YIELD))
    }
}

/// Builds a WebSocket ID from a gateway tag and that gateway's counter.
pub fn ws_id(gateway_tag: u32, counter: u32) -> u64 {
    (u64::from(gateway_tag) << 32) | u64::from(counter)
}

/// The message of the `UNAVAILABLE` status with which a draining worker
/// cuts a stream that comes up: the gateway reads it as "this worker is
/// stopping", not as a failed connection.
pub const DRAINING_STATUS: &str = "worker is draining";

/// The WebSocket ID as clients see it, e.g. `"1f3a09c2-17"`.
pub fn ws_id_string(ws_id: u64) -> String {
    format!("{:08x}-{}", ws_id >> 32, ws_id & 0xffff_ffff)
}
