//! `cachet compile-cache`: the compile cache from the command line (optimum-cli neuron cache's
//! commands, plus `status`, `cleanup`, `wrap` and `hash`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cachet::compile::hub::{self, HubCache, HubOptions, LookupFilter};
use cachet::compile::kernels::{self, KernelCacheKey};
use cachet::compile::local::{self, CleanupOptions, LocalCache};
use cachet::compile::{CacheEntry, CacheLayout, CompileCache, EntryBuilder, WrapCommand, pyjson};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Compile cache: hash entries the optimum-neuron way, keep a crash-safe local cache, share it on the Hub.
#[derive(Args, Debug)]
pub struct CompileCacheArgs {
    #[command(subcommand)]
    command: CompileCacheCommand,
    /// Local cache directory (default: $CACHET_COMPILE_CACHE or /var/tmp/cachet-compile-cache).
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
struct EndpointArgs {
    /// Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co).
    #[arg(long)]
    endpoint: Option<String>,
    /// Network timeout in seconds (connect and each read).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Args, Debug, Clone)]
struct HubArgs {
    /// Cache repo (default: $CUSTOM_CACHE_REPO, the saved one, then the public default).
    #[arg(long)]
    repo: Option<String>,
    #[command(flatten)]
    net: EndpointArgs,
}

#[derive(Args, Debug, Clone)]
struct LayoutArgs {
    /// Compiler name (first half of the `<compiler>-<version>` folder).
    #[arg(long, default_value = "neuronxcc")]
    compiler: String,
    /// Compiler version.
    #[arg(long)]
    compiler_version: Option<String>,
    /// Registry tool version (optimum-neuron's version for Neuron repos).
    #[arg(long, default_value = "0.4.5")]
    tool_version: String,
}

#[derive(Args, Debug, Clone, Default)]
struct FactorArgs {
    /// Task (e.g. text-generation).
    #[arg(long)]
    task: Option<String>,
    /// dtype (torch_dtype), e.g. bfloat16.
    #[arg(long)]
    dtype: Option<String>,
    /// Static batch size.
    #[arg(long)]
    batch_size: Option<u64>,
    /// Static sequence length.
    #[arg(long)]
    sequence_length: Option<u64>,
    /// Number of cores (tp_degree).
    #[arg(long)]
    num_cores: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum CompileCacheCommand {
    /// Create a cache repo on the Hub (private unless --public) and make it the default.
    Create {
        /// Repo name (`name` under your user, or `org/name`).
        #[arg(short = 'n', long)]
        name: Option<String>,
        /// Make the repo public.
        #[arg(long)]
        public: bool,
        #[command(flatten)]
        net: EndpointArgs,
    },
    /// Save REPO as the default cache repo.
    Set {
        /// Repo id (`org/name`).
        repo: String,
        #[command(flatten)]
        net: EndpointArgs,
    },
    /// Search the Hub registry for compiled entries of MODEL_ID.
    Lookup {
        /// Model id (`org/name`).
        model_id: String,
        /// Also list entries of the same architecture (arch digest of this config.json).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        factors: FactorArgs,
        #[command(flatten)]
        layout: LayoutArgs,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Upload local entries the Hub repo lacks.
    Synchronize {
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Show entries, sizes and versions of the local cache.
    Status,
    /// Remove interrupted writes and corrupt entries; optionally old versions or everything.
    Cleanup {
        /// Remove compiler versions other than the newest of each compiler (or --keep).
        #[arg(long)]
        old_versions: bool,
        /// Compiler folder to keep with --old-versions (`<compiler>-<version>`).
        #[arg(long)]
        keep: Option<String>,
        /// Remove everything (local cache only).
        #[arg(long)]
        all: bool,
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// With --old-versions, also prune the Hub repo in one commit: folders of other versions
        /// of the kept compilers (--keep, else the local cache's newest of each compiler).
        #[arg(long)]
        hub: bool,
        /// With --hub, also delete registry entries of other tool versions and the MODULE_
        /// folders only they name (e.g. 0.4.5 keeps optimum-neuron 0.4.5's registry).
        #[arg(long, requires = "hub")]
        tool_version: Option<String>,
        #[command(flatten)]
        hub_args: HubArgs,
    },
    /// Run a compiler command through the cache: `wrap --output OUT -- cmd args…`.
    Wrap {
        /// A file or folder the command writes (repeatable).
        #[arg(long = "output", short = 'o', required = true)]
        outputs: Vec<PathBuf>,
        /// An extra input file to hash (arguments naming files are hashed anyway).
        #[arg(long = "input", short = 'i')]
        inputs: Vec<PathBuf>,
        /// An environment variable that affects the output (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Compiler version (default: checksum of the compiler binary).
        #[arg(long)]
        compiler_version: Option<String>,
        /// The Make-syntax depfile the command writes (default: found from gcc-style `-MD`,
        /// `-MMD`, `-MF`, `-Wp,-MD,FILE`); the files it lists, such as `#include`d headers,
        /// are part of the key.
        #[arg(long)]
        depfile: Option<PathBuf>,
        /// Also use the Hub cache (download hits, upload compiles to a writable repo).
        #[arg(long)]
        hub: bool,
        /// The compiler command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Share burn's GPU kernel cache (~/.cache/cubecl): `push` a snapshot, `pull` it elsewhere.
    Kernels {
        /// `push` or `pull`.
        #[arg(value_parser = ["push", "pull"])]
        action: String,
        /// Device name the kernels were tuned on (e.g. the wgpu adapter name).
        #[arg(long)]
        device: String,
        /// Backend (e.g. wgpu-vulkan).
        #[arg(long, default_value = "wgpu")]
        backend: String,
        /// burn version.
        #[arg(long, default_value = "0.22.1")]
        burn_version: String,
        /// cubecl version.
        #[arg(long, default_value = "0.11.3")]
        cubecl_version: String,
        /// The cubecl cache folder (default: cubecl's own: target/environment of the Cargo
        /// workspace around the current directory, else $XDG_CACHE_HOME/cubecl or ~/.cache/cubecl).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also use the Hub cache repo.
        #[arg(long)]
        hub: bool,
    },
    /// Print the optimum-neuron entry hash and arch digest of a config.
    Hash {
        /// The model's config.json.
        #[arg(long)]
        config: PathBuf,
        /// The compilation factors as JSON (optimum-neuron's neuron config).
        #[arg(long)]
        neuron_config: Option<PathBuf>,
        /// The model id.
        #[arg(long)]
        model_id: String,
        #[command(flatten)]
        factors: FactorArgs,
    },
}

fn hub_options(args: &EndpointArgs) -> HubOptions {
    HubOptions {
        endpoint: args.endpoint.clone(),
        timeout: Duration::from_secs(args.timeout),
        ..HubOptions::default()
    }
}

fn repo_for(args: &HubArgs) -> Result<hub::RepoChoice> {
    match &args.repo {
        Some(repo) => Ok(hub::RepoChoice {
            repo: repo.clone(),
            origin: "flag",
        }),
        None => hub::resolve_repo().context("no cache repo configured"),
    }
}

fn print(json_out: bool, value: Value, text: impl FnOnce()) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        text();
    }
    Ok(())
}

fn read_json(path: &PathBuf) -> Result<pyjson::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Parsed like Python's json.loads so hashes match optimum-neuron's.
    pyjson::loads(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Runs `cachet compile-cache …`.
pub fn run(args: CompileCacheArgs) -> Result<()> {
    let root = args
        .cache_dir
        .clone()
        .unwrap_or_else(local::default_cache_dir);
    let json_out = args.json;
    match args.command {
        CompileCacheCommand::Hash {
            config,
            neuron_config,
            model_id,
            factors,
        } => {
            let config = read_json(&config)?;
            let entry = match neuron_config {
                Some(path) => CacheEntry::new(
                    model_id,
                    factors.task.as_deref(),
                    config,
                    Some(read_json(&path)?),
                )?,
                None => {
                    let mut b = EntryBuilder::new(model_id, config);
                    if let Some(t) = factors.task {
                        b = b.task(t);
                    }
                    if let Some(d) = &factors.dtype {
                        b = b.dtype(d);
                    }
                    if let Some(v) = factors.batch_size {
                        b = b.batch_size(v);
                    }
                    if let Some(v) = factors.sequence_length {
                        b = b.sequence_length(v);
                    }
                    if let Some(v) = factors.num_cores {
                        b = b.num_cores(v);
                    }
                    b.build()?
                }
            };
            let (hash, arch) = (entry.hash(), entry.arch_digest());
            print(json_out, json!({"hash": hash, "arch_digest": arch}), || {
                println!("hash:        {hash}");
                println!("arch_digest: {arch}");
            })
        }
        CompileCacheCommand::Status => {
            let status = local::status(&root)?;
            print(json_out, serde_json::to_value(&status)?, || {
                println!("cache: {}", status.root.display());
                if status.versions.is_empty() {
                    println!("  (empty)");
                }
                for v in &status.versions {
                    println!(
                        "  {:<40} {:>5} modules {:>5} foreign {:>5} registry files  {:>10}  tools {:?}{}",
                        v.compiler_dir,
                        v.modules,
                        v.unmanaged_modules,
                        v.registry_files,
                        human(v.bytes),
                        v.tool_versions,
                        if v.staging_leftovers > 0 {
                            format!("  ({} interrupted writes)", v.staging_leftovers)
                        } else {
                            String::new()
                        }
                    );
                }
                println!("total: {}", human(status.total_bytes));
            })
        }
        CompileCacheCommand::Cleanup {
            old_versions,
            keep,
            all,
            dry_run,
            hub,
            tool_version,
            hub_args,
        } => {
            // Decide everything about the Hub before touching the local cache.
            let hub_target = if hub {
                if !old_versions || all {
                    bail!(
                        "--hub prunes old versions on the Hub: use it with --old-versions, not --all"
                    );
                }
                let choice = repo_for(&hub_args)?;
                if choice.origin == "default" {
                    bail!(
                        "{} is the read-only public cache; pass --repo or set CUSTOM_CACHE_REPO to prune your own",
                        choice.repo
                    );
                }
                let keep: Vec<String> = match &keep {
                    Some(k) => vec![k.clone()],
                    None if root.is_dir() => local::newest_versions(&root)?,
                    None => Vec::new(),
                };
                if keep.is_empty() {
                    bail!(
                        "no compiler version to keep on the Hub: pass --keep <compiler>-<version>"
                    );
                }
                let options = hub_options(&hub_args.net);
                if !dry_run && hub::resolve_token(&options).is_none() {
                    bail!(
                        "deleting from {} needs a Hub token with write access; set HF_TOKEN or log in (or use --dry-run)",
                        choice.repo
                    );
                }
                Some((HubCache::new(&choice.repo, options)?, keep))
            } else {
                None
            };
            let report = local::cleanup(
                &root,
                &CleanupOptions {
                    old_versions,
                    all,
                    dry_run,
                    keep,
                    staging_grace: Duration::from_secs(3600),
                },
            )?;
            let hub_report = match hub_target {
                Some((cache, keep)) => {
                    Some(cache.prune_old_versions(&keep, tool_version.as_deref(), dry_run)?)
                }
                None => None,
            };
            let mut value = serde_json::to_value(&report)?;
            if let Some(h) = &hub_report {
                value["hub"] = serde_json::to_value(h)?;
            }
            print(json_out, value, || {
                let verb = if report.dry_run {
                    "would remove"
                } else {
                    "removed"
                };
                for p in &report.removed {
                    println!("{verb} {}", p.display());
                }
                println!(
                    "{verb} {} in {} paths",
                    human(report.bytes),
                    report.removed.len()
                );
                if let Some(h) = &hub_report {
                    let verb = if h.dry_run { "would delete" } else { "deleted" };
                    for p in &h.deleted {
                        println!("{verb} {}:{p}", h.repo);
                    }
                    println!(
                        "{verb} {} in {} files from {} (kept {}){}",
                        human(h.bytes),
                        h.deleted.len(),
                        h.repo,
                        h.kept.join(", "),
                        if h.attempts > 0 {
                            ", in one commit"
                        } else {
                            ""
                        }
                    );
                }
            })
        }
        CompileCacheCommand::Create { name, public, net } => {
            let repo = hub::create_repo(&hub_options(&net), name.as_deref(), public)?;
            let saved = hub::save_repo(&repo)?;
            print(
                json_out,
                json!({"repo": repo, "private": !public, "saved_to": saved}),
                || {
                    println!(
                        "created {} cache repo {repo}; saved as default in {}",
                        if public { "public" } else { "private" },
                        saved.display()
                    );
                },
            )
        }
        CompileCacheCommand::Set { repo, net } => {
            let cache = HubCache::new(&repo, hub_options(&net))?;
            let info = cache
                .info()
                .with_context(|| format!("{repo} does not exist or is not visible to you"))?;
            let saved = hub::save_repo(&repo)?;
            print(
                json_out,
                json!({"repo": repo, "private": info.private, "saved_to": saved}),
                || {
                    println!("default cache repo set to {repo} ({})", saved.display());
                },
            )
        }
        CompileCacheCommand::Lookup {
            model_id,
            config,
            factors,
            layout,
            hub,
        } => {
            let choice = repo_for(&hub)?;
            let cache = HubCache::new(&choice.repo, hub_options(&hub.net))?;
            let layout =
                CacheLayout::new(layout.compiler, layout.compiler_version.unwrap_or_default())
                    .with_tool_version(layout.tool_version);
            let arch = match &config {
                Some(path) => Some(
                    EntryBuilder::new(model_id.clone(), read_json(path)?)
                        .task(factors.task.clone().unwrap_or_default())
                        .build()
                        .map(|e| {
                            if factors.task.is_some() {
                                e.arch_digest()
                            } else {
                                CacheEntry::new(
                                    e.model_id(),
                                    None,
                                    pyjson::Value::Object(e.config().clone()),
                                    None,
                                )
                                .map(|e| e.arch_digest())
                                .unwrap_or_default()
                            }
                        })?,
                ),
                None => None,
            };
            let filter = LookupFilter {
                task: factors.task,
                dtype: factors.dtype,
                batch_size: factors.batch_size,
                sequence_length: factors.sequence_length,
                num_cores: factors.num_cores,
                factors: Vec::new(),
            };
            let found = cache.lookup(&layout, &model_id, arch.as_deref(), &filter)?;
            let rows: Vec<Value> = found
                .iter()
                .map(|(path, e)| {
                    json!({"path": path, "hash": e.hash(), "model_id": e.model_id(), "task": e.task(),
                           "compile_config": e.compile_config()})
                })
                .collect();
            print(
                json_out,
                json!({"repo": choice.repo, "entries": rows}),
                || {
                    println!("{} entries for {model_id} in {}", found.len(), choice.repo);
                    for (path, e) in &found {
                        println!("  {}  {}", e.hash(), path);
                        println!("      {}", e.compile_config());
                    }
                },
            )
        }
        CompileCacheCommand::Synchronize { hub } => {
            let choice = repo_for(&hub)?;
            if choice.origin == "default" {
                bail!(
                    "{} is the read-only public cache; create your own with `cachet compile-cache create`",
                    choice.repo
                );
            }
            let cache = HubCache::new(&choice.repo, hub_options(&hub.net))?;
            let mut reports = Vec::new();
            for v in local::status(&root)?.versions {
                let (compiler, version) = v
                    .compiler_dir
                    .split_once('-')
                    .unwrap_or((v.compiler_dir.as_str(), ""));
                let local = LocalCache::new(&root, CacheLayout::new(compiler, version));
                let report = cache.synchronize(&local)?;
                reports.push((v.compiler_dir, report));
            }
            let value = json!({"repo": choice.repo, "folders": reports.iter().map(|(d, r)| json!({"folder": d, "report": r})).collect::<Vec<_>>()});
            print(json_out, value, || {
                for (dir, r) in &reports {
                    println!(
                        "{dir}: uploaded {} files ({}), {} already on the Hub{}",
                        r.uploaded.len(),
                        human(r.bytes),
                        r.already_present,
                        if r.skipped.is_empty() {
                            String::new()
                        } else {
                            format!(", skipped {:?}", r.skipped)
                        }
                    );
                }
            })
        }
        CompileCacheCommand::Kernels {
            action,
            device,
            backend,
            burn_version,
            cubecl_version,
            dir,
            hub,
        } => {
            let key = KernelCacheKey {
                device,
                backend,
                burn_version,
                cubecl_version,
            };
            let dir = dir.unwrap_or_else(kernels::default_kernel_dir);
            let local = LocalCache::new(&root, key.layout());
            let cache = if hub {
                CompileCache::from_env_with_local(local)
            } else {
                CompileCache::local_only(local)
            };
            if action == "push" {
                let module = kernels::push(&cache, &key, &dir)?;
                print(
                    json_out,
                    json!({"hash": module.hash, "files": module.manifest.files.len(), "bytes": module.manifest.total_bytes()}),
                    || {
                        println!(
                            "kernel cache {} published: {} files, {}",
                            module.hash,
                            module.manifest.files.len(),
                            human(module.manifest.total_bytes())
                        );
                    },
                )
            } else {
                let restored = kernels::pull(&cache, &key, &dir)?;
                print(
                    json_out,
                    json!({"restored": restored, "dir": dir}),
                    || match restored {
                        Some(n) => {
                            println!("restored {n} kernel cache files into {}", dir.display())
                        }
                        None => {
                            println!("no kernel cache published for this device/backend/versions")
                        }
                    },
                )
            }
        }
        CompileCacheCommand::Wrap {
            outputs,
            inputs,
            env,
            compiler_version,
            depfile,
            hub,
            command,
        } => {
            let wrap = WrapCommand {
                argv: command,
                outputs,
                inputs,
                env,
                compiler_version,
                depfile,
            };
            let local = LocalCache::new(&root, wrap.layout()?);
            let cache = if hub {
                CompileCache::from_env_with_local(local)
            } else {
                CompileCache::local_only(local)
            };
            let outcome = wrap.run(&cache)?;
            let source = outcome.source;
            let module = outcome.module.as_ref().map(|m| &m.dir);
            print(
                json_out,
                json!({
                    "hash": outcome.entry.hash(),
                    "source": source,
                    "module": module,
                    "dependencies": outcome.dependencies,
                }),
                || {
                    eprintln!(
                        "cachet compile-cache: {source:?} ({})",
                        outcome.entry.hash()
                    )
                },
            )
        }
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
