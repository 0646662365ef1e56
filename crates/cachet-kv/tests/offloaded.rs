//! The offloaded caches on the CPU: a real host tier (layers as bytes outside the compute
//! device's tensors), uploads and prefetches counted and timed, one upload worker per cache, and
//! the same keys and values as the non-offloaded caches.

use burn::tensor::{Device, Distribution, Tensor};
use cachet_kv::{Cache, DynamicCache, KvError, OffloadedCache, OffloadedStaticCache, StaticCache};

/// The tests count this process's upload threads: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const LAYERS: usize = 4;
const HEADS: usize = 2;
const DIM: usize = 8;

fn kv(len: usize, device: &Device) -> Tensor<4> {
    Tensor::random([1, HEADS, len, DIM], Distribution::Default, device)
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// Bytes of one layer's keys and values at `tokens` tokens.
fn layer_bytes(tokens: usize) -> usize {
    2 * HEADS * tokens * DIM * 4
}

/// Names of this process's threads.
fn thread_names() -> Vec<(String, String)> {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| {
                    let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
                    Some((
                        t.file_name().to_string_lossy().into_owned(),
                        name.trim().to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn upload_workers() -> Vec<String> {
    thread_names()
        .into_iter()
        .filter(|(_, name)| name == "kv-upload")
        .map(|(tid, _)| tid)
        .collect()
}

#[test]
fn the_host_tier_holds_the_layers_and_the_compute_side_two() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let mut offloaded = OffloadedCache::new(&device, &device);
    let mut reference = DynamicCache::new();
    let (prompt, steps) = (64, 6);
    let positions: Vec<usize> = (0..prompt).collect();
    for layer in 0..LAYERS {
        let k = kv(prompt, &device);
        let (ko, vo, lo) = offloaded
            .update(layer, k.clone(), k.clone(), &positions)
            .unwrap();
        let (kr, vr, lr) = reference.update(layer, k.clone(), k, &positions).unwrap();
        assert_eq!((values(ko), values(vo), lo), (values(kr), values(vr), lr));
    }
    // The prompt went to the host tier; nothing was uploaded yet.
    assert_eq!(offloaded.stats().uploads, 0);
    assert_eq!(offloaded.memory_bytes(), offloaded.host_bytes());
    assert!(offloaded.host_bytes() >= LAYERS * layer_bytes(prompt));
    let mut worker = None;
    for step in 0..steps {
        let position = prompt + step;
        for layer in 0..LAYERS {
            let k = kv(1, &device);
            let (ko, vo, lo) = offloaded
                .update(layer, k.clone(), k.clone(), &[position])
                .unwrap();
            let (kr, vr, lr) = reference.update(layer, k.clone(), k, &[position]).unwrap();
            assert_eq!(lo, lr);
            assert_eq!(values(ko), values(kr), "step {step} layer {layer}");
            assert_eq!(values(vo), values(vr));
            // One worker thread for the cache's whole life, never one per upload.
            let workers = upload_workers();
            assert_eq!(workers.len(), 1, "{:?}", thread_names());
            assert_eq!(*worker.get_or_insert(workers[0].clone()), workers[0]);
        }
    }
    let stats = offloaded.stats();
    // Every decode step uploads every layer, each prefetched while the previous one computed.
    assert_eq!(stats.uploads, LAYERS * steps, "{stats:?}");
    assert_eq!(stats.prefetched, stats.uploads, "{stats:?}");
    assert!(!stats.transfer_time.is_zero(), "{stats:?}");
    assert!((0.0..=1.0).contains(&stats.overlap()));
    let last = prompt + steps;
    assert!(stats.uploaded_bytes >= (LAYERS * layer_bytes(prompt)) as u64);
    // On the compute side: the layer being computed and the next one, never the whole cache.
    assert!(
        stats.peak_compute_bytes <= 2 * layer_bytes(last),
        "{stats:?}"
    );
    assert!(
        stats.peak_compute_bytes >= layer_bytes(prompt + 1),
        "{stats:?}"
    );
    assert!(offloaded.host_bytes() >= LAYERS * layer_bytes(last));
    // The worker ends with the cache.
    drop(offloaded);
    assert!(upload_workers().is_empty(), "{:?}", thread_names());
}

#[test]
fn clones_crop_and_reorder_act_on_the_host_tier() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let mut cache = OffloadedCache::new(&device, &device);
    let a = Tensor::cat(vec![kv(3, &device), kv(3, &device)], 0);
    for layer in 0..2 {
        cache
            .update(layer, a.clone(), a.clone(), &[0, 1, 2])
            .unwrap();
    }
    let mut clone = cache.boxed_clone();
    let b = Tensor::cat(vec![kv(1, &device), kv(1, &device)], 0);
    clone.update(0, b.clone(), b.clone(), &[3]).unwrap();
    assert_eq!((cache.seq_length(0), clone.seq_length(0)), (3, 4));
    // Beams: row 1 twice; the stored rows follow.
    cache.reorder(&[1, 1]).unwrap();
    let (k, _, _) = cache.update(0, b.clone(), b.clone(), &[3]).unwrap();
    let row1 = a.clone().slice([1..2, 0..HEADS, 0..3, 0..DIM]);
    let got = k.slice([0..2, 0..HEADS, 0..3, 0..DIM]);
    assert_eq!(
        values(got),
        values(Tensor::cat(vec![row1.clone(), row1], 0))
    );
    assert!(matches!(
        cache.reorder(&[2]),
        Err(KvError::BatchIndex { index: 2, batch: 2 })
    ));
    cache.crop(2).unwrap();
    assert_eq!(cache.seq_length(0), 2);
    cache.reset();
    assert_eq!((cache.seq_length(0), cache.memory_bytes()), (0, 0));
}

#[test]
fn the_offloaded_static_cache_is_bounded_like_the_static_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let mut cache = OffloadedStaticCache::new(8, &device, &device).unwrap();
    let mut reference = StaticCache::new(8).unwrap();
    let a = kv(6, &device);
    let positions: Vec<usize> = (0..6).collect();
    cache.update(0, a.clone(), a.clone(), &positions).unwrap();
    reference
        .update(0, a.clone(), a.clone(), &positions)
        .unwrap();
    // The capacity is reserved up front, as the static cache allocates it.
    assert_eq!(cache.memory_bytes(), reference.memory_bytes());
    let b = kv(3, &device);
    let err = cache.update(0, b.clone(), b, &[6, 7, 8]).unwrap_err();
    assert!(matches!(err, KvError::Full { capacity: 8, .. }), "{err}");
    assert_eq!(cache.seq_length(0), 6, "nothing stored");
    // All layers together are checked against the memory limit at the first allocation.
    let one_layer = layer_bytes(8) as u64;
    let mut bounded = OffloadedStaticCache::new(8, &device, &device)
        .unwrap()
        .with_num_layers(3)
        .with_memory_limit(2 * one_layer);
    let err = bounded.update(0, a.clone(), a, &positions).unwrap_err();
    assert!(
        matches!(err, KvError::TooLarge { layers: 3, bytes, .. } if bytes == 3 * one_layer),
        "{err}"
    );
    assert_eq!(bounded.memory_bytes(), 0);
}
