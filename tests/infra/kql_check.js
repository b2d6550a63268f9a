// Parses and analyses KQL with Microsoft's Kusto language service (@kusto/language-service-next) against the
// Application Insights schema, so a broken alert or workbook query fails the build instead of Azure.
// stdin: JSON [{"where": "...", "query": "..."}]; stdout: JSON [{"where", "errors": ["..."]}].
// Table schemas: https://learn.microsoft.com/azure/azure-monitor/app/data-model-complete (the classic
// Application Insights tables a component-scoped log alert or workbook queries).
"use strict";
require("@kusto/language-service-next/bridge.js");
require("@kusto/language-service-next/Kusto.Language.Bridge.js");

const K = global.Kusto.Language;
const common = "operation_Name:string, operation_Id:string, operation_ParentId:string, " +
  "operation_SyntheticSource:string, session_Id:string, user_Id:string, user_AuthenticatedId:string, " +
  "user_AccountId:string, application_Version:string, client_Type:string, client_Model:string, client_OS:string, " +
  "client_IP:string, client_City:string, client_StateOrProvince:string, client_CountryOrRegion:string, " +
  "client_Browser:string, cloud_RoleName:string, cloud_RoleInstance:string, appId:string, appName:string, " +
  "iKey:string, sdkVersion:string, itemId:string, itemType:string, itemCount:int, " +
  "customDimensions:dynamic, customMeasurements:dynamic";
const TABLES = {
  requests: "timestamp:datetime, id:string, source:string, name:string, url:string, success:bool, " +
    "resultCode:string, duration:real, performanceBucket:string",
  dependencies: "timestamp:datetime, id:string, target:string, type:string, name:string, data:string, " +
    "success:bool, resultCode:string, duration:real, performanceBucket:string",
  traces: "timestamp:datetime, message:string, severityLevel:int",
  exceptions: "timestamp:datetime, problemId:string, handledAt:string, type:string, message:string, " +
    "assembly:string, method:string, outerType:string, outerMessage:string, outerAssembly:string, " +
    "outerMethod:string, innermostType:string, innermostMessage:string, innermostAssembly:string, " +
    "innermostMethod:string, severityLevel:int, details:dynamic",
  customEvents: "timestamp:datetime, name:string",
  customMetrics: "timestamp:datetime, name:string, value:real, valueCount:int, valueSum:real, valueMin:real, " +
    "valueMax:real, valueStdDev:real",
  availabilityResults: "timestamp:datetime, id:string, name:string, location:string, success:bool, " +
    "message:string, size:real, duration:real, performanceBucket:string",
};
const tables = Object.entries(TABLES).map(
  ([name, columns]) => K.Symbols.TableSymbol.From("(" + columns + ", " + common + ")").WithName(name));
const globals = K.GlobalState.Default.WithDatabase(new K.Symbols.DatabaseSymbol.$ctor1("appinsights", tables, false));

const items = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = items.map(({ where, query }) => {
  const diagnostics = K.KustoCode.ParseAndAnalyze(query, globals).GetDiagnostics();
  const errors = [];
  for (let i = 0; i < diagnostics.Count; i++) {
    const d = diagnostics.getItem(i);
    if (String(d.Severity).toLowerCase() === "error") {
      errors.push(`${d.Message} (at ${d.Start}: ${JSON.stringify(query.substr(d.Start, Math.max(d.Length, 1)))})`);
    }
  }
  return { where, errors };
});
process.stdout.write(JSON.stringify(out));
