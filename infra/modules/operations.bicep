// Operating the connector (docs/operations.md): scheduled-query alert rules over the OpenTelemetry
// metrics and spans the app exports to Application Insights (shared/telemetry.py), an optional
// e-mail action group, and the operator's workbook (operations-workbook.json).
//
// Metrics arrive in customMetrics (name = instrument name, customDimensions = attributes); invocation
// spans (name = function name) in dependencies (HTTP and timer: INTERNAL spans) or requests (queue: CONSUMER
// spans), so queries over invocations read `union requests, dependencies`. Query rules:
// https://learn.microsoft.com/azure/azure-monitor/alerts/alerts-create-log-alert-rule
// Bicep reference: https://learn.microsoft.com/azure/templates/microsoft.insights/scheduledqueryrules
// Workbooks from templates: https://learn.microsoft.com/azure/azure-monitor/visualize/workbooks-automate

@description('Application Insights component the app exports to.')
param applicationInsightsName string

@description('Azure region of the alert rules and the workbook.')
param location string

@description('Tags applied to the resources.')
param tags object = {}

@description('Prefix of the alert rule and action group names.')
param namePrefix string

@description('E-mail address alerted when a rule fires (OPERATIONS_ALERT_EMAIL); empty: rules without an action group (visible in the portal only).')
param alertEmail string = ''

@description('Refresh failure rate (% of token refreshes not ok over 30 minutes) that fires the failure-rate alert.')
@minValue(1)
@maxValue(100)
param refreshFailureRatePercent int = 20

@description('Refreshes needed in the window before the failure rate is judged (avoids alerts on a handful).')
@minValue(1)
param refreshFailureRateMinimum int = 20

@description('Accounts turning reauth_required within one hour that count as a spike.')
@minValue(1)
param reauthSpikeThreshold int = 25

@description('Enable the alert rules.')
param alertsEnabled bool = true

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: '${namePrefix}-operator'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'connector'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

// Entra codes meaning "the app's own credential was rejected" (shared/ms_errors.py CLIENT_CREDENTIAL_REJECTED,
// plus invalid_client and unknown_client); tests/infra checks the two lists agree.
var credentialRejectedCodes = [
  'invalid_client'
  'unknown_client'
  'invalid_client_secret'
  'client_secret_expired'
  'invalid_client_certificate'
  'client_assertion_expired'
  'no_federated_credential'
  'client_assertion_mismatch'
  'invalid_client_assertion'
]
var codeList = '"${join(credentialRejectedCodes, '", "')}"'

var alerts = [
  {
    key: 'invalid-client'
    displayName: 'Connector: client credential rejected (invalid_client)'
    description: 'Entra rejected the app\'s own credential (client secret, certificate or federated credential). Every refresh and connect fails until it is fixed. docs/operations.md#client-credential-rejected'
    severity: 0
    frequency: 'PT5M'
    window: 'PT15M'
    query: 'let refreshes = customMetrics | where name == "connector.refresh" and tostring(customDimensions["outcome"]) == "invalid_client" | summarize n = sum(valueSum);\nlet calls = union requests, dependencies | where tostring(customDimensions["connector.error.code"]) in (${codeList}) | summarize n = todouble(count());\nunion refreshes, calls | summarize failures = sum(n)'
    measure: 'failures'
    aggregation: 'Total'
    threshold: 0
  }
  {
    key: 'refresh-failure-rate'
    displayName: 'Connector: token refresh failure rate above ${refreshFailureRatePercent}%'
    description: 'More than ${refreshFailureRatePercent}% of token refreshes failed (invalid_grant, invalid_client, throttled or transient) in 30 minutes. docs/operations.md#refresh-failure-rate'
    severity: 2
    frequency: 'PT15M'
    window: 'PT30M'
    query: 'customMetrics | where name == "connector.refresh" | extend outcome = tostring(customDimensions["outcome"]) | summarize total = sum(valueSum), failed = sumif(valueSum, outcome != "ok") | where total >= ${refreshFailureRateMinimum} | project failureRate = 100.0 * failed / total'
    measure: 'failureRate'
    aggregation: 'Maximum'
    threshold: refreshFailureRatePercent
  }
  {
    key: 'reauth-spike'
    displayName: 'Connector: reauth_required spike'
    description: 'At least ${reauthSpikeThreshold} accounts turned reauth_required within an hour: a tenant-wide revocation, a Conditional Access change or a consent withdrawn. docs/operations.md#reauth_required-spike'
    severity: 2
    frequency: 'PT15M'
    window: 'PT1H'
    query: 'customMetrics | where name == "connector.account.transitions" and tostring(customDimensions["status"]) == "reauth_required" | summarize accounts = sum(valueSum)'
    measure: 'accounts'
    aggregation: 'Total'
    threshold: reauthSpikeThreshold - 1
  }
  {
    key: 'webhooks-abandoned'
    displayName: 'Connector: webhook deliveries abandoned'
    description: 'A webhook event was dropped after its last attempt: the receiver (WEBHOOK_URL) failed for hours. docs/operations.md#webhook-deliveries-abandoned'
    severity: 1
    frequency: 'PT15M'
    window: 'PT15M'
    query: 'customMetrics | where name == "connector.webhook.delivery" and tostring(customDimensions["outcome"]) == "abandoned" | summarize abandoned = sum(valueSum)'
    measure: 'abandoned'
    aggregation: 'Total'
    threshold: 0
  }
  {
    key: 'poison-messages'
    displayName: 'Connector: queue messages moved to a poison queue'
    description: 'A queue message failed maxDequeueCount times (host.json) and went to <queue>-poison: its work (a refresh, a webhook, a notification) will not run again by itself. docs/operations.md#poison-queue-messages'
    severity: 1
    frequency: 'PT15M'
    window: 'PT15M'
    query: 'let hostLogs = traces | where message has "MaxDequeueCount" or message has "-poison" | summarize n = todouble(count());\nlet lastAttempts = union requests, dependencies | where success == false and toint(customDimensions["messaging.message.delivery_attempt"]) >= 5 | summarize n = todouble(count());\nunion hostLogs, lastAttempts | summarize poisoned = sum(n)'
    measure: 'poisoned'
    aggregation: 'Total'
    threshold: 0
  }
]

resource rules 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [for a in alerts: {
  name: '${namePrefix}-${a.key}'
  location: location
  tags: tags
  properties: {
    displayName: a.displayName
    description: a.description
    severity: a.severity
    enabled: alertsEnabled
    evaluationFrequency: a.frequency
    windowSize: a.window
    scopes: [
      appInsights.id
    ]
    criteria: {
      allOf: [
        {
          query: a.query
          timeAggregation: a.aggregation
          metricMeasureColumn: a.measure
          operator: 'GreaterThan'
          threshold: a.threshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    // The queries name tables (requests, traces, customMetrics) that a fresh workspace has not created yet:
    // without this, creating the rule fails validation on the first deployment.
    skipQueryValidation: true
    actions: {
      actionGroups: empty(alertEmail) ? [] : [
        actionGroup.id
      ]
    }
  }
}]

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, applicationInsightsName, 'connector-operations')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'Outlook connector: operations'
    category: 'workbook'
    // sourceId: the workbook is listed under the Application Insights resource (Monitoring > Workbooks); the
    // template's fallbackResourceIds (empty in the file) gets the same id, so opening it from the gallery or a
    // link queries that component instead of asking for one.
    sourceId: appInsights.id
    serializedData: replace(loadTextContent('operations-workbook.json'), '"fallbackResourceIds": []',
      '"fallbackResourceIds": ["${appInsights.id}"]')
  }
}

output workbookId string = workbook.id
output alertRuleNames array = [for (a, i) in alerts: rules[i].name]
