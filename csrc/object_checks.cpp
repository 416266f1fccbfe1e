// Identity checks of Python objects, run as one call: what a compiled call plan (vpns_fast.deploy.call_plan) checks
// before every run, that the modules, tensors and forwards it was made from are still the network's.
//
// Why: the same checks as Python loops (the module tree's edges, each kernel module's class, forward and tensors,
// each called module's hooks) took 26 us warm but 211 us (current) + 21 us (hooks) right after a call of the network,
// whose 10 ms of kernels had evicted the modules' dicts from the caches (ResNet-50 at 10% kept, batch 1, 2 threads,
// 2-vCPU Zen 5, medians of 100 calls, 2026-12-06): 2.3% of the call. The interpreter runs the lookups one after
// another; here each is a few loads, and the CPU overlaps the cache misses of neighbouring checks: 929 checks for that
// network (817 + 112 hooks), 0.08 ms with the Python around them (current 74-77 us, hooks 3-4 us). Tried, not kept:
// requesting every checked object and each dict's keys table first (prefetch) took ResNet-50's checks right after a
// call from 69.8 to 63.8 us, ResNet-18's from 17.1 to 16.9 us (5% kept, 2-vCPU Intel Xeon, 2026-12-07,
// bench/results/cpu-tried-not-kept-2026-12-07-intel-xeon.txt, section 9).
#include <torch/extension.h>

#include <utility>
#include <vector>

namespace {

class ObjectChecks {
 public:
  // mapping[key] is value (the dict's own lookup: no __missing__, no __getitem__ of a subclass)
  void add_item(const py::dict& mapping, const py::object& key, const py::object& value) {
    items_.push_back({mapping, key, value});
  }
  // key is not in mapping
  void add_absent(const py::dict& mapping, const py::object& key) { items_.push_back({mapping, key, py::object()}); }
  // getattr(owner, name) is value (the full attribute lookup: a class's method through its bases)
  void add_attribute(const py::object& owner, const py::str& name, const py::object& value) {
    attributes_.push_back({owner, name, value});
  }
  // owner.__dict__ is mapping (the instance's own dict slot, no attribute lookup)
  void add_instance_dict(const py::object& owner, const py::dict& mapping) { dicts_.push_back({owner, mapping}); }
  // type(instance) is kind
  void add_type(const py::object& instance, const py::type& kind) { types_.push_back({instance, kind}); }
  // mapping is empty (a module's hook dicts)
  void add_empty(const py::dict& mapping) { empty_.push_back(mapping); }

  // Whether every check holds. Raises what a lookup raises (a key whose __eq__ raises).
  bool operator()() const {
    for (const auto& [instance, kind] : types_) {
      if (reinterpret_cast<PyObject*>(Py_TYPE(instance.ptr())) != kind.ptr()) return false;
    }
    for (const auto& [owner, mapping] : dicts_) {
      PyObject* found = PyObject_GenericGetDict(owner.ptr(), nullptr);  // new reference
      if (found == nullptr) throw py::error_already_set();
      const bool same = found == mapping.ptr();
      Py_DECREF(found);
      if (!same) return false;
    }
    for (const py::dict& mapping : empty_) {
      if (PyDict_Size(mapping.ptr()) != 0) return false;
    }
    for (const Item& item : items_) {
      PyObject* found = PyDict_GetItemWithError(item.mapping.ptr(), item.key.ptr());  // borrowed
      if (found == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (found != item.value.ptr()) return false;  // an absent key is expected as a null value
    }
    for (const Attribute& attribute : attributes_) {
      PyObject* found = PyObject_GetAttr(attribute.owner.ptr(), attribute.name.ptr());  // new reference
      if (found == nullptr) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
        PyErr_Clear();
        return false;
      }
      const bool same = found == attribute.value.ptr();
      Py_DECREF(found);
      if (!same) return false;
    }
    return true;
  }

  // The cycle collector's view (tp_traverse, tp_clear): the objects held are visited, so that a cycle through them
  // (a layer holding the module that holds the plan) is collected.
  int traverse(visitproc visit, void* arg) const {
    for (const Item& item : items_) {
      Py_VISIT(item.mapping.ptr());
      Py_VISIT(item.key.ptr());
      Py_VISIT(item.value.ptr());
    }
    for (const Attribute& attribute : attributes_) {
      Py_VISIT(attribute.owner.ptr());
      Py_VISIT(attribute.name.ptr());
      Py_VISIT(attribute.value.ptr());
    }
    for (const auto& [owner, mapping] : dicts_) {
      Py_VISIT(owner.ptr());
      Py_VISIT(mapping.ptr());
    }
    for (const auto& [instance, kind] : types_) {
      Py_VISIT(instance.ptr());
      Py_VISIT(kind.ptr());
    }
    for (const py::dict& mapping : empty_) Py_VISIT(mapping.ptr());
    return 0;
  }
  // Drops every check (and reference); a call then holds trivially, but a cleared object is being collected.
  void clear() {
    items_.clear();
    attributes_.clear();
    dicts_.clear();
    types_.clear();
    empty_.clear();
  }

  size_t size() const { return items_.size() + attributes_.size() + dicts_.size() + types_.size() + empty_.size(); }

 private:
  struct Item {
    py::dict mapping;
    py::object key, value;  // a null value: the key must be absent
  };
  struct Attribute {
    py::object owner;
    py::str name;
    py::object value;
  };
  std::vector<Item> items_;
  std::vector<Attribute> attributes_;
  std::vector<std::pair<py::object, py::dict>> dicts_;
  std::vector<std::pair<py::object, py::type>> types_;
  std::vector<py::dict> empty_;
};

// Whether the Python object's C++ value exists yet (the collector may visit it between allocation and __init__).
bool constructed(PyObject* self) {
  return reinterpret_cast<py::detail::instance*>(self)->get_value_and_holder().holder_constructed();
}

}  // namespace

namespace vpns {

void bind_object_checks(py::module_& m) {
  py::class_<ObjectChecks>(m, "ObjectChecks",
                           "Identity checks of Python objects run as one call (csrc/object_checks.cpp): each added "
                           "check, then calling it says whether all hold. The objects are held until it is freed.",
                           py::custom_type_setup([](PyHeapTypeObject* heap_type) {
                             PyTypeObject* type = &heap_type->ht_type;
                             type->tp_flags |= Py_TPFLAGS_HAVE_GC;
                             type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) {
                               Py_VISIT(Py_TYPE(self));  // a heap type's instances visit their type
                               if (!constructed(self)) return 0;
                               return py::cast<const ObjectChecks&>(py::handle(self)).traverse(visit, arg);
                             };
                             type->tp_clear = [](PyObject* self) {
                               if (constructed(self)) py::cast<ObjectChecks&>(py::handle(self)).clear();
                               return 0;
                             };
                           }))
      .def(py::init<>())
      .def("add_item", &ObjectChecks::add_item, py::arg("mapping"), py::arg("key"), py::arg("value"),
           "mapping[key] is value (the dict's own lookup).")
      .def("add_absent", &ObjectChecks::add_absent, py::arg("mapping"), py::arg("key"), "key is not in mapping.")
      .def("add_attribute", &ObjectChecks::add_attribute, py::arg("owner"), py::arg("name"), py::arg("value"),
           "getattr(owner, name) is value.")
      .def("add_instance_dict", &ObjectChecks::add_instance_dict, py::arg("owner"), py::arg("mapping"),
           "owner.__dict__ is mapping.")
      .def("add_type", &ObjectChecks::add_type, py::arg("instance"), py::arg("kind"), "type(instance) is kind.")
      .def("add_empty", &ObjectChecks::add_empty, py::arg("mapping"), "len(mapping) == 0.")
      .def("__call__", &ObjectChecks::operator(), "Whether every check holds.")
      .def("__len__", &ObjectChecks::size);
}

}  // namespace vpns
