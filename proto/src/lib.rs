//! image-builder's wire contract: the code generated from the `.proto` files beside this crate
//! (mk3's `builder` service, gitpod's content-service initializers, the ops service), the codec
//! every generated service and client encodes with, and the clients the service's own tools
//! (the `builds` CLI, the scenario runner) reach it through. The service's `api/` serves it.

pub mod client;

/// gitpod's content-service initializers (`initializer.proto`).
#[allow(missing_docs, clippy::all)]
pub mod contentservice {
    tonic::include_proto!("contentservice");
}

/// mk3's `builder` package (`imgbuilder.proto`).
#[allow(missing_docs, clippy::all)]
pub mod builder {
    tonic::include_proto!("builder");
}

/// image-builder's operations API (`ops.proto`).
#[allow(missing_docs, clippy::all)]
pub mod ops {
    tonic::include_proto!("imagebuilder.ops.v1");
}

/// The encoded descriptors of every file in `proto/` and what they import, for server
/// reflection (`grpcurl list` without the proto files).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Metadata key of the Logs extension: start the replay at this byte of the log instead of 0,
/// so a listener that lost its stream continues where it was without a duplicate.
pub const LOG_OFFSET_METADATA: &str = "x-image-builder-log-offset";

/// The codec of every generated service and client: prost's, with a smaller yield threshold.
///
/// tonic hands an answer stream to HTTP/2 in chunks of at least its yield threshold (32 KiB by
/// default), and a Logs listener that stops reading holds about three such chunks in the
/// stack below the service (one in the encoder's hands, one waiting for flow-control window,
/// the rest of one partly sent). At 16 KiB, one log piece
/// (the journal's `LOG_PIECE_BYTES`) is one chunk: `cargo
/// bench --bench listeners` measures what a listener costs beside a bare tonic server.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// How tonic buffers what it encodes: 8 KiB to start with, a chunk handed on at 16 KiB.
    fn settings() -> BufferSettings {
        BufferSettings::new(8 * 1024, 16 * 1024)
    }

    /// Prost's codec, encoding in buffers of 8 KiB handed on at 16 KiB.
    #[derive(Debug, Clone, Copy)]
    pub struct StreamCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for StreamCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for StreamCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
        }
    }
}
