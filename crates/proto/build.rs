//! Compiles `proto/` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let file = format!("{root}/sharedconn.proto");
    println!("cargo:rerun-if-changed={file}");
    let descriptors = protox::compile([&file], [root])?;
    tonic_prost_build::configure()
        // Frames are shared between sockets by reference count, not copied.
        .bytes(".")
        // Small codec buffers: private mode has a stream per socket.
        .codec_path("crate::LinkCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
