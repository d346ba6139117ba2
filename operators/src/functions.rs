//! Every function a pipeline may call, by name: DataFusion's scalar, higher-order, aggregate
//! and window functions, and Weir's detectors. The planner types SQL against it and gateways
//! decode plans with it, so both sides agree.
//!
//! DataFusion's scalar functions are made one module at a time (math, core, string, ...),
//! the first time a function of that module is looked up, not all at start. Making them
//! runs a little code of each of several hundred functions, scattered through the binary,
//! and every page of code a process touches stays resident: made all at once, they were
//! about 9 MB of every gateway's memory, whose pipelines call a handful.
//!
//! ```text
//!  lookup "sqrt" ──> aggregate or window name? (few, made at first use) ── no ──>
//!                    scalar modules in order, each made on first visit ──> math: sqrt
//! ```
//!
//! The lookup gives what DataFusion's own registry gives: the same functions, adjusted to
//! the default configuration the same way; no name is in two modules (a test checks it, so
//! the module order cannot change which function a name means).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, OnceLock};

use datafusion::common::config::ConfigOptions;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::registry::FunctionRegistry;
use datafusion::logical_expr::planner::ExprPlanner;
use datafusion::logical_expr::{AggregateUDF, HigherOrderUDF, ScalarUDF, WindowUDF};

use crate::detect;

/// The functions of every pipeline in this process.
pub fn functions() -> &'static Functions {
    static FUNCTIONS: LazyLock<Functions> = LazyLock::new(Functions::new);
    &FUNCTIONS
}

/// A DataFusion module of scalar functions, made on first use.
struct ScalarModule {
    make: fn() -> Vec<Arc<ScalarUDF>>,
    /// By name and by alias.
    functions: OnceLock<HashMap<String, Arc<ScalarUDF>>>,
}

/// The modules in the order a name is looked for: those pipelines call most come first.
const SCALAR_MODULES: [fn() -> Vec<Arc<ScalarUDF>>; 9] = [
    datafusion::functions::math::functions,
    datafusion::functions::core::functions,
    datafusion::functions::string::functions,
    datafusion::functions::datetime::functions,
    datafusion::functions::unicode::functions,
    datafusion::functions::regex::functions,
    datafusion::functions::encoding::functions,
    datafusion::functions::crypto::functions,
    datafusion::functions_nested::all_default_nested_functions,
];

/// Functions by name, made on demand; see the module docs.
pub struct Functions {
    scalar: Vec<ScalarModule>,
    higher_order: OnceLock<HashMap<String, Arc<HigherOrderUDF>>>,
    aggregate: OnceLock<HashMap<String, Arc<AggregateUDF>>>,
    window: OnceLock<HashMap<String, Arc<WindowUDF>>>,
    planners: OnceLock<Vec<Arc<dyn ExprPlanner>>>,
}

impl Functions {
    fn new() -> Self {
        Self {
            scalar: SCALAR_MODULES
                .iter()
                .map(|&make| ScalarModule {
                    make,
                    functions: OnceLock::new(),
                })
                .collect(),
            higher_order: OnceLock::new(),
            aggregate: OnceLock::new(),
            window: OnceLock::new(),
            planners: OnceLock::new(),
        }
    }

    /// The scalar function called `name` (or having it as an alias).
    pub fn scalar(&self, name: &str) -> Option<Arc<ScalarUDF>> {
        // Aggregates and windows are looked up by the SQL planner only after it asked for a
        // scalar function of the name: answering those without visiting every module keeps
        // `avg(v)` from making all of them.
        if self.aggregates().contains_key(name) || self.windows().contains_key(name) {
            return None;
        }
        self.scalar
            .iter()
            .find_map(|module| scalar_module(module).get(name).cloned())
    }

    pub fn higher_order(&self, name: &str) -> Option<Arc<HigherOrderUDF>> {
        self.higher_orders().get(name).cloned()
    }

    pub fn aggregate(&self, name: &str) -> Option<Arc<AggregateUDF>> {
        self.aggregates().get(name).cloned()
    }

    pub fn window(&self, name: &str) -> Option<Arc<WindowUDF>> {
        self.windows().get(name).cloned()
    }

    /// What turns SQL operators and syntax into function calls (`||`, `EXTRACT`, `a[1]`).
    pub fn expr_planners(&self) -> &[Arc<dyn ExprPlanner>] {
        self.planners
            .get_or_init(SessionStateDefaults::default_expr_planners)
    }

    /// Every scalar function's name and aliases: for suggestions after a typo, when making
    /// all of them no longer matters.
    pub fn scalar_names(&self) -> Vec<String> {
        self.scalar
            .iter()
            .flat_map(|module| scalar_module(module).keys().cloned())
            .collect()
    }

    pub fn higher_order_names(&self) -> Vec<String> {
        self.higher_orders().keys().cloned().collect()
    }

    pub fn aggregate_names(&self) -> Vec<String> {
        self.aggregates().keys().cloned().collect()
    }

    pub fn window_names(&self) -> Vec<String> {
        self.windows().keys().cloned().collect()
    }

    fn higher_orders(&self) -> &HashMap<String, Arc<HigherOrderUDF>> {
        self.higher_order.get_or_init(|| {
            by_name(
                SessionStateDefaults::default_higher_order_functions(),
                |f| f.name(),
                |f| f.aliases(),
            )
        })
    }

    fn aggregates(&self) -> &HashMap<String, Arc<AggregateUDF>> {
        self.aggregate.get_or_init(|| {
            by_name(
                SessionStateDefaults::default_aggregate_functions(),
                |f| f.name(),
                |f| f.aliases(),
            )
        })
    }

    fn windows(&self) -> &HashMap<String, Arc<WindowUDF>> {
        self.window.get_or_init(|| {
            let mut all = SessionStateDefaults::default_window_functions();
            all.extend(detect::window_udfs());
            by_name(all, |f| f.name(), |f| f.aliases())
        })
    }
}

fn scalar_module(module: &ScalarModule) -> &HashMap<String, Arc<ScalarUDF>> {
    module.functions.get_or_init(|| {
        // As DataFusion's session does when it registers them: some functions take settings
        // (a time zone, say) from the configuration, here always the default one.
        let config = ConfigOptions::default();
        let adjusted = (module.make)()
            .into_iter()
            .map(|f| match f.inner().with_updated_config(&config) {
                Some(updated) => Arc::new(updated),
                None => f,
            })
            .collect();
        by_name(adjusted, |f| f.name(), |f| f.aliases())
    })
}

/// Functions keyed by name and by each alias.
fn by_name<F>(
    functions: Vec<Arc<F>>,
    name: impl Fn(&F) -> &str,
    aliases: impl Fn(&F) -> &[String],
) -> HashMap<String, Arc<F>> {
    let mut map = HashMap::with_capacity(functions.len() * 2);
    for function in functions {
        for alias in aliases(&function) {
            map.insert(alias.clone(), Arc::clone(&function));
        }
        map.insert(name(&function).to_owned(), function);
    }
    map
}

fn unknown(kind: &str, name: &str) -> DataFusionError {
    DataFusionError::Plan(format!("unknown {kind} function '{name}'"))
}

/// For decoding plans: datafusion-proto resolves function names through a registry.
impl FunctionRegistry for Functions {
    fn udfs(&self) -> HashSet<String> {
        self.scalar_names().into_iter().collect()
    }

    fn higher_order_function_names(&self) -> HashSet<String> {
        self.higher_order_names().into_iter().collect()
    }

    fn udafs(&self) -> HashSet<String> {
        self.aggregate_names().into_iter().collect()
    }

    fn udwfs(&self) -> HashSet<String> {
        self.window_names().into_iter().collect()
    }

    fn udf(&self, name: &str) -> DfResult<Arc<ScalarUDF>> {
        self.scalar(name).ok_or_else(|| unknown("scalar", name))
    }

    fn higher_order_function(&self, name: &str) -> DfResult<Arc<HigherOrderUDF>> {
        self.higher_order(name)
            .ok_or_else(|| unknown("higher-order", name))
    }

    fn udaf(&self, name: &str) -> DfResult<Arc<AggregateUDF>> {
        self.aggregate(name)
            .ok_or_else(|| unknown("aggregate", name))
    }

    fn udwf(&self, name: &str) -> DfResult<Arc<WindowUDF>> {
        self.window(name).ok_or_else(|| unknown("window", name))
    }

    fn expr_planners(&self) -> Vec<Arc<dyn ExprPlanner>> {
        Functions::expr_planners(self).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::session_state::SessionStateBuilder;

    use super::*;

    #[test]
    fn no_name_is_in_two_scalar_modules() {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (index, make) in SCALAR_MODULES.iter().enumerate() {
            let mut names = HashSet::new();
            for function in make() {
                names.insert(function.name().to_owned());
                names.extend(function.aliases().iter().cloned());
            }
            for name in names {
                if let Some(other) = seen.insert(name.clone(), index) {
                    panic!("'{name}' is in scalar modules {other} and {index}");
                }
            }
        }
    }

    /// The same names mean the same functions as in a DataFusion session with every default
    /// function, and nothing is missing: a DataFusion upgrade that adds a module fails here.
    #[test]
    fn every_function_of_datafusions_session_is_found_under_the_same_names() {
        let mut window = SessionStateDefaults::default_window_functions();
        window.extend(detect::window_udfs());
        let session = SessionStateBuilder::new()
            .with_scalar_functions(SessionStateDefaults::default_scalar_functions())
            .with_higher_order_functions(SessionStateDefaults::default_higher_order_functions())
            .with_aggregate_functions(SessionStateDefaults::default_aggregate_functions())
            .with_window_functions(window)
            .build();
        let ours = Functions::new();
        for (name, function) in session.scalar_functions() {
            let found = ours.scalar(name).map(|f| f.name().to_owned());
            assert_eq!(found.as_deref(), Some(function.name()), "scalar '{name}'");
        }
        for (name, function) in session.aggregate_functions() {
            let found = ours.aggregate(name).map(|f| f.name().to_owned());
            assert_eq!(
                found.as_deref(),
                Some(function.name()),
                "aggregate '{name}'"
            );
        }
        for (name, function) in session.window_functions() {
            let found = ours.window(name).map(|f| f.name().to_owned());
            assert_eq!(found.as_deref(), Some(function.name()), "window '{name}'");
        }
        for (name, function) in session.higher_order_functions() {
            let found = ours.higher_order(name).map(|f| f.name().to_owned());
            assert_eq!(
                found.as_deref(),
                Some(function.name()),
                "higher-order '{name}'"
            );
        }
        assert_eq!(
            ours.scalar_names().len(),
            session.scalar_functions().len(),
            "no extra scalar names"
        );
    }

    #[test]
    fn an_aggregate_is_not_taken_for_a_scalar_function_and_modules_are_made_on_demand() {
        let functions = Functions::new();
        assert!(functions.scalar("avg").is_none());
        assert!(functions.scalar("zscore").is_none());
        assert!(
            functions.scalar.iter().all(|m| m.functions.get().is_none()),
            "asking for an aggregate made no scalar module"
        );
        assert_eq!(
            functions
                .scalar("sqrt")
                .map(|f| f.name().to_owned())
                .as_deref(),
            Some("sqrt")
        );
        let made = functions
            .scalar
            .iter()
            .filter(|m| m.functions.get().is_some())
            .count();
        assert_eq!(made, 1, "sqrt is in the first module");
        assert!(functions.aggregate("avg").is_some());
        assert!(functions.udf("no_such_function").is_err());
    }
}
